"""Export a training checkpoint to the shipped weights: fp16 network, code statistics, metadata.

    python -m backend.train.export --ckpt .ckpt/main --out weights/imhead.safetensors

Code statistics (see backend/weights.py): mean and Cholesky factor of the covariance of the training
identity codes (new heads are sampled from that Gaussian) and, per region, the mean and principal
directions of the decoded 32-d region codes over the training identities (per-region controls).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..model import ImHead, ImHeadConfig
from ..weights import FORMAT, model_tensors, save_weights
from .checkpoint import load_checkpoint
from .losses import TrainModule

RIDGE = 1e-6  # added to the covariance diagonal so the Cholesky factor exists for any code set


@torch.no_grad()
def code_statistics(model: ImHead, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    codes = codes.double()
    n, d = codes.shape
    mean = codes.mean(0)
    cen = codes - mean
    cov = cen.T @ cen / max(n - 1, 1) + RIDGE * torch.eye(d, dtype=codes.dtype)
    zr = torch.cat([model.region_codes(c.float()).double() for c in codes.split(1024)], 0)  # (n, R, Z)
    rmean = zr.mean(0)
    rc = (zr - rmean).permute(1, 0, 2)  # (R, n, Z)
    _, s, vh = torch.linalg.svd(rc, full_matrices=False)  # vh rows: principal directions
    z = model.cfg.region_dim
    std = torch.zeros(model.cfg.n_regions, z, dtype=codes.dtype)
    std[:, : s.shape[1]] = s / max(n - 1, 1) ** 0.5
    dirs = torch.eye(z, dtype=codes.dtype).repeat(model.cfg.n_regions, 1, 1)
    dirs[:, : vh.shape[1]] = vh
    return {
        "id_mean": mean.float(),
        "id_chol": torch.linalg.cholesky(cov).float(),
        "region_mean": rmean.float(),
        "region_dirs": dirs.float(),
        "region_std": std.float(),
    }


ENCODED_SAMPLES = 16384  # identity draws whose codes stand for an encoder's code distribution


def load_training_checkpoint(ckpt: Path) -> tuple[TrainModule, dict]:
    with safe_open(str(Path(ckpt) / "state.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["train"])
        keys = set(f.keys())
        if "codes.weight" in keys:
            n_train, coeff_dim = f.get_slice("codes.weight").get_shape()[0], None
        else:
            n_train, coeff_dim = 0, f.get_slice("id_encoder.weight").get_shape()[1]
    module = TrainModule(ImHead(ImHeadConfig.from_json(info["config"])), n_train, id_coeff_dim=coeff_dim)
    load_checkpoint(ckpt, module, None)
    return module.eval(), info


@torch.no_grad()
def training_codes(module: TrainModule) -> torch.Tensor:
    """The codes the statistics describe: the auto-decoder table, or the encoder's codes of N(0, I) draws."""
    if not module.encodes_identities:
        return module.codes.weight.detach()
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(ENCODED_SAMPLES, module.id_encoder.in_features, generator=g)
    return module.id_encoder(coeffs)


def export(ckpt: Path, out: Path, extra_meta: dict[str, str] | None = None) -> str:
    module, info = load_training_checkpoint(ckpt)
    codes = training_codes(module)
    extras = code_statistics(module.model, codes)
    meta = {
        "format": FORMAT,
        "config": module.model.cfg.to_json(),
        "trained": "true",
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": json.dumps({k: info.get(k) for k in ("step", "samples", "elapsed_s", "pieces", "world", "device",
                                                         "weights", "args")}),
        "n_train_identities": "all (encoder)" if module.encodes_identities else str(len(codes)),
    }
    meta.update(extra_meta or {})
    return save_weights(out, model_tensors(module.model, extras), meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("weights/imhead.safetensors"))
    args = p.parse_args(argv)
    digest = export(args.ckpt, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
