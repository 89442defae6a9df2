"""Engine session: loads the model once and answers the server's operations (docs/architecture.md).

Every op takes (params: dict, arrays: dict[str, np.ndarray], progress) and returns (params, arrays)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import __version__, constants, errors
from ..weights import load_model
from . import validate
from .extract import ExtractStats, Mesh, check_resolution, extract_mesh
from .head import HeadSpec

DEFAULT_RESOLUTION = 256
TOPK = 8  # nearest local networks evaluated per point during extraction ...
DROP_TOL = 1e-3  # ... unless that leaves out more blend-weight mass than this: then all 39 are evaluated
CHUNK = 1 << 15  # points per network call (bounds the (points x topk x hidden) activations)
LIPSCHITZ = 1.5  # assumed |grad sdf| bound of the trained SDF (checked on the data by extract_mesh)


class Progress(Protocol):
    def report(self, fraction: float, message: str) -> None: ...

    @property
    def cancelled(self) -> bool: ...


class NullProgress:
    cancelled = False

    def report(self, fraction: float, message: str) -> None:
        pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise errors.InvalidInput(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise errors.InvalidInput("device 'cuda' requested but no CUDA GPU is available")
    return dev


class Session:
    def __init__(self, weights_dir: Path | None = None, device: str = "auto"):
        self.device = resolve_device(device)
        self.loaded = load_model(weights_dir, str(self.device))
        self.model = self.loaded.model.eval().requires_grad_(False)
        self.extras = self.loaded.extras

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        return {
            "backend_version": __version__,
            "torch_device": str(self.device),
            "model_name": self.loaded.meta.get("name", "imhead"),
            "trained": bool(self.loaded.trained),
        }

    # ------------------------------------------------------------------ heads
    def sample_identity(self, seed: int) -> np.ndarray:
        """id_mean + id_chol @ eps with eps ~ N(0, I) from a numpy generator (same on every device)."""
        eps = np.random.default_rng(seed).standard_normal(constants.ID_DIM)
        mean = self.extras["id_mean"].double().cpu().numpy()
        chol = self.extras["id_chol"].double().cpu().numpy()
        return (mean + chol @ eps).astype(np.float32)

    def decode(self, head: HeadSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Identity code (1,256), region codes (1,39,32) with overrides applied, anchors (1,39,3)."""
        z_id = torch.as_tensor(head.identity, device=self.device)[None]
        with torch.no_grad():
            zr = self.model.region_codes(z_id).clone()
            for name, code in head.region_overrides.items():
                zr[0, self.region_index(name)] = torch.as_tensor(code, device=self.device)
            k = self.model.anchors(zr)
        return z_id, zr, k

    def region_index(self, name: str) -> int:
        return self.region_names.index(name)

    @property
    def region_names(self) -> list[str]:
        return []

    @property
    def expression_names(self) -> list[str]:
        return []

    def parse_head(self, data: object) -> HeadSpec:
        return HeadSpec.from_dict(data, self.region_names, self.expression_names)

    def decode_params(self, data: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(self.parse_head(data))

    def sdf_fn(self, zr: torch.Tensor, k: torch.Tensor, dropped: list[float]):
        """Canonical SDF callable (N,3) -> (N,) evaluating each point with its TOPK nearest local networks
        where the left-out blend mass is <= DROP_TOL, with all 39 elsewhere. dropped[0] tracks the largest
        mass actually left out."""

        def sdf(x: torch.Tensor) -> torch.Tensor:
            xb = x[None]
            _, _, lost = self.model.topk_weights(xb, k, TOPK)
            full = lost[0] > DROP_TOL
            out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
            if (~full).any():
                out[~full] = self.model.sdf(x[~full][None], zr, k, topk=TOPK)[0].float()
                dropped[0] = max(dropped[0], float(lost[0][~full].max()))
            if full.any():
                out[full] = self.model.sdf(x[full][None], zr, k)[0].float()
            return out

        return sdf

    def canonical_mesh(self, zr: torch.Tensor, k: torch.Tensor, resolution: int) -> tuple[Mesh, ExtractStats, float]:
        """Extract the canonical (neutral) surface; also returns the largest blend-weight mass left out."""
        dropped = [0.0]
        mesh, stats = extract_mesh(self.sdf_fn(zr, k, dropped), resolution, device=self.device,
                                   lipschitz=LIPSCHITZ, chunk=CHUNK)
        return mesh, stats, dropped[0]

    # ------------------------------------------------------------------ ops
    def generate(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        progress = progress or NullProgress()
        validate.keys(params, {"head", "seed", "resolution"}, "generate")
        resolution = check_resolution(params.get("resolution", DEFAULT_RESOLUTION))
        if params.get("head") is not None:
            head = self.parse_head(params["head"])
        else:
            head = HeadSpec(identity=self.sample_identity(validate.seed(params.get("seed", 0))))
        progress.report(0.0, "extracting the surface")
        _, zr, k = self.decode(head)
        mesh, stats, dropped = self.canonical_mesh(zr, k, resolution)
        if len(mesh.faces) == 0:
            raise errors.BackendError("the model produced no surface inside the canonical box", code="empty_surface")
        progress.report(1.0, "done")
        out = {"head": head.to_dict(), "stats": extract_stats(stats, dropped)}
        arrays = {"vertices": mesh.vertices, "faces": mesh.faces, "canonical": mesh.vertices.copy()}
        return out, arrays


def extract_stats(stats: ExtractStats, dropped: float) -> dict:
    return {
        "resolution": stats.resolution,
        "voxel_m": stats.voxel,
        "points_evaluated": stats.points_evaluated,
        "dense_points": stats.dense_points,
        "lipschitz": stats.lipschitz,
        "lipschitz_observed": stats.lipschitz_observed,
        "components_removed": stats.components_removed,
        "topk": TOPK,
        "max_dropped_blend_weight": dropped,
        "seconds": stats.seconds,
    }
