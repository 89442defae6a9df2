"""Shipped weights: safetensors + a SHA-256 side file; nothing is ever unpickled.

File layout (`weights/imhead.safetensors`):
  model.<param>   network parameters (fp16 on disk, float32 once loaded)
  extras.<name>   statistics for sampling and per-region controls (float32):
                  id_mean (256,), id_chol (256,256) lower Cholesky factor of the training-code covariance,
                  region_mean (39,32), region_dirs (39,32,32) (row i = i-th principal direction of region j's
                  code over training identities), region_std (39,32) (std along each direction)
  metadata        format, config (ImHeadConfig JSON), plus free-form training information (strings)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

import backend

from . import constants
from .errors import WeightsError
from .model import ImHead, ImHeadConfig

FORMAT = "imhead-weights/1"
WEIGHTS_FILE = "imhead.safetensors"
EXTRA_KEYS = ("id_mean", "id_chol", "region_mean", "region_dirs", "region_std")
UNTRAINED_SEED = 0
UNTRAINED_CODE_STD = 0.01
SMALL_TENSOR = 4096


def default_weights_dir() -> Path:
    return Path(backend.__file__).parent.parent / "weights"


@dataclass
class LoadedModel:
    model: ImHead
    config: ImHeadConfig
    meta: dict[str, str]
    trained: bool
    extras: dict[str, Tensor] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """Write `tensors` and string `meta` as safetensors plus `<path>.sha256`; returns the hex digest."""
    path = Path(path)
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata values must be strings: {bad}")
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def model_tensors(model: ImHead, extras: dict[str, Tensor], dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The tensors `save_weights` should write for a model and its extras. Small tensors (anchors, biases)
    stay float32: they cost nothing and fp16 would move anchors by up to 0.05 mm."""
    out = {f"model.{k}": v.detach().to(dtype if v.numel() >= SMALL_TENSOR else torch.float32)
           for k, v in model.state_dict().items()}
    out.update({f"extras.{k}": v.detach().float() for k, v in extras.items()})
    return out


def untrained_extras(cfg: ImHeadConfig) -> dict[str, Tensor]:
    """Code statistics for the geometric-init network: an isotropic Gaussian of small codes."""
    R, Z, D = cfg.n_regions, cfg.region_dim, cfg.id_dim
    return {
        "id_mean": torch.zeros(D),
        "id_chol": torch.eye(D) * UNTRAINED_CODE_STD,
        "region_mean": torch.zeros(R, Z),
        "region_dirs": torch.eye(Z).expand(R, Z, Z).clone(),
        "region_std": torch.full((R, Z), UNTRAINED_CODE_STD),
    }


def load_model(weights_dir: Path | None = None, device: str = "cpu", allow_untrained: bool = False) -> LoadedModel:
    """Load verified weights from `weights_dir` (default: the repository's `weights/`). A missing weights file
    is a WeightsError; only with `allow_untrained` (a developer flag) does it give the deterministic
    geometric-init network (a sphere) with trained=False."""
    wdir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    path = wdir / WEIGHTS_FILE
    if not path.exists():
        if not allow_untrained:
            raise WeightsError(f"the model weights are missing: {path} does not exist. Reinstall the imHead "
                               "extension (its package ships weights/imhead.safetensors), or point the backend "
                               "at a folder holding them with --weights")
        cfg = ImHeadConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            model = ImHead(cfg)
        model.to(device).eval()
        extras = {k: v.to(device) for k, v in untrained_extras(cfg).items()}
        return LoadedModel(model, cfg, {"format": FORMAT, "trained": "false"}, False, extras)

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"the model weights at {path} cannot be read ({exc.strerror or exc}); check the file's "
                           "permissions or reinstall the imHead extension") from exc
    _verify_checksum(path, data)
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: unsupported weights format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ImHeadConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: bad model config in metadata: {exc}") from exc
    expected = (constants.N_REGIONS, constants.N_EXPRESSIONS, constants.ID_DIM)
    if (cfg.n_regions, cfg.n_expressions, cfg.id_dim) != expected:
        raise WeightsError(f"{path}: model sizes do not match this backend's constants")

    state = {k[len("model."):]: _float32(v) for k, v in tensors.items() if k.startswith("model.")}
    extras = {k[len("extras."):]: _float32(v) for k, v in tensors.items() if k.startswith("extras.")}
    missing = [k for k in EXTRA_KEYS if k not in extras]
    if missing:
        raise WeightsError(f"{path}: missing code statistics {missing}")
    bad = [k for k, v in list(state.items()) + list(extras.items()) if not np.isfinite(v.numpy()).all()]
    if bad:
        raise WeightsError(f"{path}: non-finite values in {bad[:5]}")
    model = ImHead(cfg)
    try:  # the model takes the loaded tensors as its parameters (no second copy)
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: parameters do not match the model config: {exc}") from exc
    extras = {k: v.to(device) for k, v in extras.items()}
    model.to(device).eval()
    return LoadedModel(model, cfg, meta, True, extras)


def _float32(v: Tensor) -> Tensor:
    """A float32 CPU copy of a loaded tensor, converted by numpy: one single-threaded pass per tensor instead
    of torch's thread pool, whose start-up dominates for ~50 small tensors on a busy CPU (0.1-0.7 s measured
    on 2 shared cores). The same values as `v.float()` (float16 -> float32 is exact)."""
    if v.dtype in (torch.float16, torch.float32, torch.float64):
        return torch.from_numpy(v.numpy().astype(np.float32))
    return v.float().clone()


def _verify_checksum(path: Path, data: bytes) -> None:
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        raise WeightsError(f"{side} is missing: cannot verify {path}")
    parts = side.read_text().split()
    expected = parts[0].lower() if parts else ""
    if len(expected) != 64:
        raise WeightsError(f"{side} does not hold a SHA-256 hex digest")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise WeightsError(f"{path} is corrupt or was modified: SHA-256 {actual} does not match {expected} in {side}")


def _read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta
