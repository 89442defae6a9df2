"""Engine session: loads the model once and answers the server's operations (docs/architecture.md).

Every op takes (params: dict, arrays: dict[str, np.ndarray], progress) and returns (params, arrays)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from .. import __version__, constants, errors
from ..cpu import thread_map, thread_slices
from ..data.atlas import load_atlas
from ..weights import load_model
from . import deform, edit, validate
from .extract import CoarseSdf, ExtractStats, Mesh, check_resolution, extract_mesh
from .sdf_eval import (FirstLayer, HeadSdf, LocalRecord, dense_local_features, fold_first_layer, heaviest_regions,
                       local_features)
from .head import HeadSpec, check_names
from .template import TemplateIndex, seam_faces

if TYPE_CHECKING:  # fit and align load scipy: imported where fitting needs them, not by the handshake
    from .align import Aligner


DEFAULT_RESOLUTION = 256
# warm_up's head: on CUDA fine enough that every kernel of the descent runs (coarse lattice of 32 cells)
WARM_UP_RESOLUTION = {"cpu": 32, "cuda": 128}
TOPK = 16  # nearest local networks per point in the CPU latent fit (FIT_TOPK)
# Point evaluations outside extraction: each point through its heaviest local networks until at most this blend
# mass is left out (renormalised over the kept ones, as sdf_eval.HeadSdf's sparse mode); None: all 39.
# Vertex attributes and posed normals, measured on a trained 128^3 head's 31k vertices against all 39 (2-core
# CPU, attribute pass): 1e-4: SDF within 15 um, template positions within 4.9 um, normals p99.9 0.21 degrees
# (max 0.46), 0.38 s; 1e-5: 2.0 um, 0.6 um, 0.04 degrees (max 0.13), 0.49 s. The mesh a 128^3 lattice gives is
# further from the field than either (marching cubes' chord error alone ~0.1 mm), and the SDF there is only the
# vertex_abs_sdf_p99_m statistic.
POINT_DROP_TOL = {"cpu": 1e-4, "cuda": None}
# The canonical SDF in deform residuals: the p99 over a mesh's vertices is the residual's p99, which 1e-5 moved
# by +0.5 um (a bias, though every value is within 2 um); 1e-6: +0.06 um (values within 0.3 um), 21 regions.
RESIDUAL_DROP_TOL = {"cpu": 1e-6, "cuda": None}
CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 18}  # points per network call: bounds (points x regions x hidden) activations
# ... where the attribute pass keeps every region's activations for its reverse pass (~45 KB a point with all 39
# regions on CUDA, ~85 KB at its peak with the batched reverse: 2.7 GB at 32k points)
GRAD_CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 15}
# Points per warp-network call in deform: on CPU small enough that the (points x 256) activations stay in cache
# (measured on 1 thread: 0.81 s per 100k warps at 4096 against 1.23 s at 128k, same FLOPs); on CUDA large.
WARP_CHUNKS = {"cpu": 1 << 12, "cuda": 1 << 18}
LIPSCHITZ = 2.5  # assumed |grad sdf| bound of the trained SDF (observed <= ~2.1 on extraction lattices)
# Extraction: floor of the per-cell Lipschitz bound (each cell uses max(floor, 1.25 x its own finite-difference
# gradient norm), extract.py); 1.5 gives the same meshes as 2.5 on the trained heads with ~1/3 fewer points.
EXTRACT_LIPSCHITZ = 1.5
# Extraction's network evaluation (engine/sdf_eval.py): on CUDA all 39 regions at every point (exact, one
# batched product per layer); on CPU each point's heaviest regions up to EXTRACT_DROP_TOL left-out mass.
EXTRACT_MODE = {"cpu": "sparse", "cuda": "dense"}
# "sparse" extraction: left-out blend mass allowed per point, and |sdf| (m) below which a point is evaluated
# again with all 39 regions (measured SDF error: 19 um at 1e-4, 2 um at 1e-5; see sdf_eval.py).
EXTRACT_DROP_TOL = 1e-4
EXTRACT_EXACT_BELOW = 2e-4
EXTRACT_CHUNKS = {"cpu": 1 << 13, "cuda": 1 << 19}  # CPU: 8192 ~10% faster than 16k (activations in cache)
# CUDA: the local networks in float16 (the fused kernel of engine/fused_sdf.py); every point whose value is
# within EXTRACT_HALF_EXACT_BELOW of zero is evaluated again at float32 accuracy (~6% of a 256^3 band's
# points), so signs are exact. The float16 error (<= 41 um on three heads' 256^3 bands) then moves a
# marching-cubes vertex by at most 41 um / (2 x 0.2 mm) = 0.1 of an edge (both corners just above the
# threshold); the bench measures the real displacement against float32 (max|dv|).
EXTRACT_HALF = {"cpu": False, "cuda": True}
EXTRACT_HALF_EXACT_BELOW = 2e-4
# The levels above the last take HeadSdf.approximate (no exact pass near zero) with this error margin in their
# sign certificates: > 2x the largest float16 (41 um) and left-out-mass (19 um) errors measured.
EXTRACT_COARSE_ERROR = 1e-4
MAX_DEFORM_POINTS = 20_000_000  # frames x vertices per deform request (output memory)
FIT_RESOLUTION = 128
FIT_SAMPLES = 20000
FIT_MIN_WEIGHT = 0.02  # fitted expression weights below this are noise (the fit starts every weight at ~0.007)
# Latent-fit budget per device: (steps, points per step, use normals). The normal term needs a double
# backward pass (about twice the kernels of a step) and did not pay for it: with GPU settings (300 x 4096,
# all 39 regions) a held-out identity fitted to 0.496 mm without it and 0.509 mm with it; fewer steps cost
# more (200: 0.541, 150: 0.577 mm). A caller may still ask for normals.
FIT_BUDGET = {"cuda": (300, 4096, False), "cpu": (100, 1024, False)}
# Local networks evaluated per point in the latent fit: on CUDA all 39 (exact, and a few batched kernels per
# layer instead of a loop over regions with a host sync); on CPU the nearest TOPK (fewer FLOPs).
FIT_TOPK = {"cuda": None, "cpu": TOPK}
EXPRESSION_RANGE = (-1.0, 2.0)  # accepted expression weights (ICT uses [0, 1]; a little over/undershoot is art)


class Progress(Protocol):
    def report(self, fraction: float, message: str) -> None: ...

    @property
    def cancelled(self) -> bool: ...


class NullProgress:
    cancelled = False

    def report(self, fraction: float, message: str) -> None:
        pass


def check_cancel(progress: Progress) -> None:
    if progress.cancelled:
        raise errors.Cancelled()


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
        self.chunk = CHUNKS.get(self.device.type, CHUNKS["cpu"])
        self.grad_chunk = GRAD_CHUNKS.get(self.device.type, GRAD_CHUNKS["cpu"])
        self.topk: int | None = TOPK  # None: every point through all 39 local networks
        self.point_drop_tol = POINT_DROP_TOL.get(self.device.type, POINT_DROP_TOL["cpu"])  # see _field
        self.residual_drop_tol = RESIDUAL_DROP_TOL.get(self.device.type, RESIDUAL_DROP_TOL["cpu"])
        self.extract_mode = EXTRACT_MODE.get(self.device.type, "sparse")  # sdf_eval.HeadSdf mode for meshes
        self.extract_half = EXTRACT_HALF.get(self.device.type, False)
        # the attribute pass through every region (no tolerance) as batched products over the region axis
        self.dense_attributes = self.device.type == "cuda"
        self.loaded = load_model(weights_dir, str(self.device))
        self.model = self.loaded.model.eval().requires_grad_(False)
        self._slots: list[int] = self.model.slot.tolist()  # region -> local network (no device sync per use)
        self.extras = self.loaded.extras
        atlas_path = Path(weights_dir) / "atlas.safetensors" if weights_dir is not None else None
        self.atlas = load_atlas(atlas_path if atlas_path is not None and atlas_path.exists() else None)
        self._template_index: TemplateIndex | None = None
        self._aligner: Aligner | None = None
        self._vertex_sdf_cache: dict[tuple, torch.Tensor] = {}  # see _cached_vertex_sdf

    # ------------------------------------------------------------------ names
    def info(self) -> dict:
        return {
            "backend_version": __version__,
            "torch_device": str(self.device),
            "model_name": self.loaded.meta.get("name", "imhead"),
            "trained": bool(self.loaded.trained),
            "regions": [{"id": i, "name": n, "mirror": self.atlas.mirror[i]} for i, n in enumerate(self.atlas.names)],
            "expressions": list(self.atlas.expressions),
        }

    @property
    def region_names(self) -> list[str]:
        return list(self.atlas.names)

    @property
    def expression_names(self) -> list[str]:
        return list(self.atlas.expressions)

    @property
    def template_index(self) -> TemplateIndex:
        if self._template_index is None:
            self._template_index = TemplateIndex(self.atlas, self.device)
        return self._template_index

    @property
    def aligner(self) -> Aligner:
        if self._aligner is None:
            from . import fit
            from .align import Aligner

            self._aligner = Aligner(*fit.template_surface(self.atlas, 20000))
        return self._aligner

    # ------------------------------------------------------------------ heads
    def parse_head(self, data: object) -> HeadSpec:
        return HeadSpec.from_dict(data, self.region_names, self.expression_names)

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
                zr[0, self.region_names.index(name)] = torch.as_tensor(code, device=self.device)
            k = self.model.anchors(zr)
        return z_id, zr, k

    def decode_regions(self, identity: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.as_tensor(np.asarray(identity, np.float32), device=self.device)[None]
            return self.model.region_codes(z)[0].cpu().numpy()

    @property
    def region_stats(self) -> edit.RegionStats:
        e = self.extras
        return edit.RegionStats(*(e[key].double().cpu().numpy() for key in ("region_mean", "region_dirs", "region_std")))

    def sliders(self, head: HeadSpec) -> dict[str, list[float]]:
        """Every region's slider positions (std units along its principal directions)."""
        codes = edit.effective_codes(head, self.decode_regions, self.region_names)
        stats = self.region_stats
        return {n: [float(v) for v in stats.coords(j, codes[j])] for j, n in enumerate(self.region_names)}

    def decode_params(self, data: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(self.parse_head(data))

    # ------------------------------------------------------------------ network evaluation
    def _field(self, x: torch.Tensor, zr: torch.Tensor, k: torch.Tensor, dropped: list[float], tol: float | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF (P,) and blended local features (P,F) at points x (P,3), differentiable in x: each point through
        its heaviest local networks, leaving out at most `tol` blend mass (None, or self.topk None: all 39);
        dropped[0] tracks the largest mass left out."""
        feat = self._features(x, zr, k, dropped, tol)
        return self.model.sdf_from_features(x, feat), feat

    def _features(self, x: torch.Tensor, zr: torch.Tensor, k: torch.Tensor, dropped: list[float], tol: float | None,
                  tape: _Tape | None = None) -> torch.Tensor:
        """_field's blended features (sdf_eval.local_features). With a tape, what _reverse needs is recorded on it."""
        m, cfg = self.model, self.model.cfg
        tol = tol if self.topk is not None else None
        anchors = k[0]
        diff = x[:, None] - anchors  # direct differences, as sdf_eval._logits
        dist = diff.norm(dim=-1)
        logits = dist.div(-cfg.sigma)
        keep = None
        if tol is not None:
            keep, left_out = heaviest_regions(logits, tol)
            if len(x):
                dropped[0] = max(dropped[0], float(left_out.max()))
            logits = logits.masked_fill(~keep, float("-inf"))
        w = torch.softmax(logits, 1)
        if tape is not None:
            tape.diff, tape.dist, tape.w = diff, dist, w
        with torch.no_grad():
            bias1 = torch.einsum("rz,rzh->rh", zr[0], m.loc_wz[m.slot]) + m.loc_b[m.slot]
        if keep is None and tape is not None and self.dense_attributes:  # memory as the loop's tape: GRAD_CHUNKS
            return dense_local_features(m, x, anchors, bias1, w, tape.dense)
        with torch.no_grad():
            first = fold_first_layer(m, anchors, bias1)
        if tape is not None:
            tape.first = first
        return local_features(m, self._slots, x, first, w, keep, None if tape is None else tape.local)[0]

    def _field_grad(self, x: torch.Tensor, zr: torch.Tensor, k: torch.Tensor, dropped: list[float],
                    tol: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_field's SDF (P,), its gradient in x (P,3) and the features (P,F), without autograd through the local
        networks: their reverse pass is _reverse (measured on the 2-core CPU for a 128^3 head's 31k vertices,
        one thread: 1.00 s against 1.15 s for autograd, which also evaluates sin and cos twice)."""
        tape = _Tape()
        with torch.no_grad():
            feat = self._features(x, zr, k, dropped, tol, tape)
        # The small fusion network through autograd, from a scalar: a tensor of output gradients would make
        # autograd import torch.fx's symbolic shapes and sympy (~0.3 s of a cold start).
        with torch.enable_grad():
            f = feat.requires_grad_(True)
            sdf = self.model.sdf_from_features(x, f)  # x needs no grad: only the fusion head is differentiated
            (dfeat,) = torch.autograd.grad(sdf.sum(), f)
        with torch.no_grad():
            return sdf.detach(), self._reverse(x, dfeat, tape), feat.detach()

    def _reverse(self, x: torch.Tensor, dfeat: torch.Tensor, tape: _Tape) -> torch.Tensor:
        """Gradient in x (P,3) of prior_sdf(x) + a function of the features with gradient dfeat (P,F) in them:
        through each taped region's network and blend weight. Only products with the (transposed) weights: no
        weight gradients."""
        m, cfg, rw = self.model, self.model.cfg, self._reverse_weights
        pc = x - m.prior_center
        dx = pc / pc.norm(dim=-1, keepdim=True)
        dw = torch.zeros_like(tape.w)
        silu_backward = torch.ops.aten.silu_backward
        for enc, pre, g in tape.dense:  # every region at every point, batched over regions (R,P,...)
            dw += torch.einsum("pf,rpf->pr", dfeat, g)
            d = torch.bmm(dfeat[None] * tape.w.t()[:, :, None], rw.wo_r)
            for a, wh in zip(reversed(pre), [*reversed(rw.wh_r), rw.wx_r]):
                d = torch.bmm(silu_backward(d, a), wh)
            dxs = torch.baddbmm(d[..., :3], d[..., 3 : enc.shape[-1]].mul_(enc[..., 3:]),
                                rw.pe_chain.expand(len(enc), -1, -1))
            dx += dxs.mul_(m.flip[:, None, :] * cfg.pe_scale).sum(0)
        if tape.local.regions:
            dx.add_(self._reverse_local(dfeat, tape, dw))
        # blend weights: softmax over the kept logits -|x - k_r| / sigma (left-out ones have w = 0)
        dl = tape.w * (dw - (tape.w * dw).sum(1, keepdim=True))
        # d|x - k_r| / dx = (x - k_r) / |x - k_r|; a point on an anchor takes 0 (no direction), as autograd does
        coef = torch.where(tape.dist > 0, dl / (tape.dist * -cfg.sigma), 0.0)
        return dx.add_(torch.einsum("pr,prc->pc", coef, tape.diff))

    def _reverse_local(self, dfeat: torch.Tensor, tape: _Tape, dw: torch.Tensor) -> torch.Tensor:
        """_reverse through the per-region loop's networks (sdf_eval.local_features): each region's gradient in
        the shared encoding, summed, then chained to x once (the encoding's derivative: x * pe_scale -> pe_scale,
        sin(f s x) -> f s cos(f s x), cos(f s x) -> -f s sin(f s x)). Writes the blend-weight gradients into dw."""
        cfg, rw = self.model.cfg, self._reverse_weights
        enc, n, w1 = tape.local.enc, 3 * cfg.pe_freqs, tape.first.w
        # the folded first layers transposed, with one zero column more: (n,96) x (96,40) products ran ~1.5x
        # faster than (96,39) ones on the 2-core CPU
        w1t = torch.cat([w1.transpose(1, 2), w1.new_zeros(w1.shape[0], w1.shape[2], 1)], 2)
        denc = enc.new_zeros((enc.shape[0], w1t.shape[2]))
        silu_backward = torch.ops.aten.silu_backward
        for r, s, idx, pre, g in tape.local.regions:
            df, wr = (dfeat, tape.w[:, r]) if idx is None else (dfeat[idx], tape.w[idx, r])
            dwr = (df * g).sum(1)
            d = torch.mm(df * wr[:, None], rw.wo[s])
            for a, wh in zip(reversed(pre), [*reversed(rw.wh[s]), w1t[r]]):
                d = torch.mm(silu_backward(d, a), wh)
            if idx is None:
                dw[:, r] = dwr
                denc += d
            else:
                dw[idx, r] = dwr
                denc.index_put_((idx,), d, accumulate=True)
        sin, cos = enc[:, 3 : 3 + n], enc[:, 3 + n : 3 + 2 * n]
        dterms = denc[:, 3 : 3 + n] * cos - denc[:, 3 + n : 3 + 2 * n] * sin
        return torch.addmm(denc[:, :3], dterms, rw.freq_chain).mul_(cfg.pe_scale)

    @cached_property
    def _reverse_weights(self) -> _ReverseWeights:
        return _ReverseWeights(self.model)

    def sdf_fn(self, zr: torch.Tensor, k: torch.Tensor, dropped: list[float]) -> Callable:
        """The SDF as deform residuals evaluate it (RESIDUAL_DROP_TOL)."""
        return lambda x: self._field(x, zr, k, dropped, self.residual_drop_tol)[0]

    def canonical_mesh(self, zr: torch.Tensor, k: torch.Tensor, resolution: int, samples: list | None = None
                       ) -> tuple[Mesh, ExtractStats, float]:
        """Extract the canonical (neutral) surface; also returns the largest blend-weight mass left out.
        self.topk None: all 39 regions everywhere on every device."""
        mode = "dense" if self.topk is None else self.extract_mode
        half = self.extract_half and mode == "dense"
        fn = HeadSdf(self.model, zr, k, mode=mode, drop_tol=EXTRACT_DROP_TOL,
                     exact_below=EXTRACT_HALF_EXACT_BELOW if half else EXTRACT_EXACT_BELOW,
                     hidden_dtype=torch.float16 if half else torch.float32)
        coarse = CoarseSdf(fn.approximate, EXTRACT_COARSE_ERROR, fn.exact_below) if fn.is_approximate else None
        mesh, stats = extract_mesh(fn, resolution, device=self.device, lipschitz=EXTRACT_LIPSCHITZ,
                                   chunk=EXTRACT_CHUNKS.get(self.device.type, EXTRACT_CHUNKS["cpu"]), samples=samples,
                                   coarse=coarse)
        return mesh, stats, fn.max_dropped

    def sdf_grad_template(self, x: np.ndarray, zr: torch.Tensor, k: torch.Tensor, dropped: list[float]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At canonical points (N,3): SDF (N,), its gradient (N,3) (one reverse pass, _field_grad) and the template
        position (N,3) from the same features. On CPU the chunks run on parallel threads (cpu.thread_map, as
        extraction's evaluations: 0.69 -> 0.64 s for a 128^3 head's 31k vertices on the 2-core machine)."""

        def run(s: slice) -> tuple[torch.Tensor, ...]:
            xt = torch.as_tensor(x[s], device=self.device, dtype=torch.float32)
            chunk_dropped = [0.0]
            sdf, grad, feat = self._field_grad(xt, zr, k, chunk_dropped, self.point_drop_tol)
            with torch.no_grad():
                tmpl = self.model.template_from_features(xt, feat)
            return sdf, grad, tmpl, torch.tensor([chunk_dropped[0]])

        if self.device.type == "cpu":
            parts = thread_map(run, thread_slices(len(x), self.grad_chunk))
        else:
            parts = [run(slice(s, s + self.grad_chunk)) for s in range(0, max(len(x), 1), self.grad_chunk)]
        sdf, grad, tmpl, chunk_dropped = (torch.cat(p).cpu().numpy() for p in zip(*parts))
        dropped[0] = max(dropped[0], float(chunk_dropped.max()))
        return sdf, grad, tmpl

    def warp_fn(self, z_id: torch.Tensor, expressions: torch.Tensor) -> deform.WarpFn:
        """Per-point backward warp for frame-indexed expressions (T,53) (per-frame constants folded in)."""
        return deform.model_warp(self.model, z_id, expressions, WARP_CHUNKS.get(self.device.type, WARP_CHUNKS["cpu"]))

    # ------------------------------------------------------------------ meshes
    def head_mesh(self, head: HeadSpec, resolution: int, progress: Progress) -> tuple[dict, dict]:
        """Canonical mesh of a head with every attribute, posed by the head's expression."""
        z_id, zr, k = self.decode(head)
        progress.report(0.05, "extracting the surface")
        mesh, ext, dropped = self.canonical_mesh(zr, k, resolution)
        if len(mesh.faces) == 0:
            raise errors.BackendError("the model produced no surface inside the canonical box", code="empty_surface")
        check_cancel(progress)
        progress.report(0.5, "attributes")
        arrays, attr_stats = self.attributes(mesh, zr, k)
        stats = extract_stats(ext, dropped, self.topk) | attr_stats
        weights = head.expression_vector(self.expression_names)
        if np.any(weights != 0):
            check_cancel(progress)
            progress.report(0.75, "posing")
            # the vertex SDF is remembered: the add-on's deform requests for this mesh and head skip it
            res = self.pose(mesh.vertices, z_id, zr, k, weights[None], exact_residual=False,
                            canonical_sdf=self._cached_vertex_sdf(mesh.vertices, zr, k))
            arrays["vertices"] = res["vertices"][0]
            arrays["normals"] = self.posed_normals(res["vertices"][0], z_id, zr, k, weights)
            stats["deform"] = {key: v for key, v in res.items() if key not in ("vertices", "residual", "converged")}
        progress.report(1.0, "done")
        return {"head": head.to_dict(), "stats": stats}, arrays

    def attributes(self, mesh: Mesh, zr: torch.Tensor, k: torch.Tensor) -> tuple[dict, dict]:
        dropped = [0.0]
        sdf, grad, tmpl = self.sdf_grad_template(mesh.vertices, zr, k, dropped)
        normals = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
        uv, island = self.template_index.uv(tmpl)
        arrays = {
            "vertices": mesh.vertices,
            "faces": mesh.faces,
            "canonical": mesh.vertices.copy(),
            "template": tmpl.astype(np.float32),
            "region": self.template_index.nearest_region(tmpl),
            "normals": normals.astype(np.float32),
            "uv": uv,
        }
        _, _, tdist = self.template_index.closest(tmpl)
        stats = {
            "vertex_abs_sdf_p99_m": float(np.percentile(np.abs(sdf), 99)),
            "template_to_surface_median_m": float(np.median(tdist)),
            "uv_seam_faces": seam_faces(mesh.faces, island),
            "vertex_max_dropped_blend_weight": dropped[0],
        }
        return arrays, stats

    def vertex_sdf(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """SDF (N,) at canonical vertices (N,3), on the session's device."""
        x_c = torch.as_tensor(canonical, device=self.device, dtype=torch.float32)
        sdf = self.sdf_fn(zr, k, [0.0])
        with torch.no_grad():
            return torch.cat([sdf(x_c[s : s + self.chunk]) for s in range(0, len(x_c), self.chunk)])

    def pose(self, canonical: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
             expressions: np.ndarray, exact_residual: bool, canonical_sdf: torch.Tensor | None = None) -> dict:
        """Deform canonical vertices (N,3) through expressions (T,53); residual = |posed-space SDF| at each
        moved vertex, i.e. |sdf(x + warp(x))| = |sdf(x_c + F)| with F = x + warp(x) - x_c the root finder's
        miss. Exact: evaluate it (T x N SDF evaluations). Otherwise its upper bound |sdf(x_c)| + L |F| (L the
        SDF's Lipschitz bound LIPSCHITZ; |F| <= 1 um where converged), which needs the SDF only once per
        canonical vertex, not per frame (canonical_sdf: that SDF, from vertex_sdf, when the caller has it).
        Frames with an all-zero expression vector are not solved (their warp is exactly zero: x = x_c)."""
        x_c = torch.as_tensor(canonical, device=self.device, dtype=torch.float32)
        e = torch.as_tensor(expressions, device=self.device, dtype=torch.float32)
        warp = self.warp_fn(z_id, e)
        result = deform.solve(warp, x_c, e.shape[0], zero_frames=(e == 0).all(1))
        T, N = e.shape[0], x_c.shape[0]
        with torch.no_grad():
            if exact_residual:  # the canonical point x + warp(x) is x_c + F
                sdf = self.sdf_fn(zr, k, [0.0])
                moved = (x_c[None] + result.root_vector).reshape(-1, 3)
                residual = torch.cat([sdf(moved[s : s + self.chunk]) for s in range(0, moved.shape[0], self.chunk)])
            else:
                sdf_c = self.vertex_sdf(canonical, zr, k) if canonical_sdf is None else canonical_sdf
                residual = sdf_c.abs()[None] + LIPSCHITZ * result.root_residual
        residual = residual.abs().view(T, N)
        conv = result.converged
        return {
            "vertices": result.vertices.cpu().numpy().astype(np.float32),
            "residual": residual.cpu().numpy().astype(np.float32),
            "converged": conv.cpu().numpy().astype(np.uint8),
            "non_converged": int((~conv).sum()),
            # torch.quantile takes at most 16M values: the p99 of the first 16M vertex-frames
            "residual_p99_m": float(torch.quantile(residual.flatten()[:16_000_000].double(), 0.99)),
            "root_residual_max_m": float(result.root_residual.max()),
            "iterations": result.iterations,
            # solver work: forward warps per vertex-frame (>= 2 where solved), vertex-frames done at x_c - warp(x_c),
            # and those that needed the exact (autograd) Jacobian
            "warp_evaluations_per_vertex_frame": result.stats["warp_points"] / max(T * N, 1),
            "stopped_at_first_estimate": result.stats["stopped_at_x0"],
            "jacobian_vertex_frames": result.stats["jacobian_points"],
        }

    def posed_normals(self, x: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
                      weights: np.ndarray) -> np.ndarray:
        """Outward normals of the posed surface: the gradient of sdf(x + warp(x)) at posed points."""
        e = torch.as_tensor(weights, device=self.device, dtype=torch.float32)[None]
        out = []
        for s in range(0, len(x), self.grad_chunk):
            xt = torch.as_tensor(x[s : s + self.grad_chunk], device=self.device, dtype=torch.float32)
            with torch.enable_grad():
                xg = xt.clone().requires_grad_(True)
                xc = xg + self.model.warp(xg[None], e, z_id)[0]
                sdf = self._field(xc, zr, k, [0.0], self.point_drop_tol)[0]
                (g,) = torch.autograd.grad(sdf.sum(), xg)
            out.append(g)
        g = torch.cat(out).cpu().numpy()
        return (g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    # ------------------------------------------------------------------ ops
    def warm_up(self) -> None:
        """Pay a first request's one-off costs now (the server calls this after the handshake): a small head
        through generate (the template index, first-call allocations; on CUDA the Triton
        kernels compile or load from their cache) and a short pose of some of its vertices (the warp network)."""
        head = HeadSpec(identity=self.sample_identity(0))
        z_id, zr, k = self.decode(head)
        _, arrays = self.head_mesh(head, WARM_UP_RESOLUTION.get(self.device.type, WARM_UP_RESOLUTION["cpu"]),
                                   NullProgress())
        weights = np.zeros((1, len(self.expression_names)), np.float32)
        weights[0, 0] = 0.5
        self.pose(arrays["canonical"][:256], z_id, zr, k, weights, exact_residual=False)

    def generate(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        progress = progress or NullProgress()
        validate.keys(params, {"head", "seed", "resolution"}, "generate")
        resolution = check_resolution(params.get("resolution", DEFAULT_RESOLUTION))
        if params.get("head") is not None:
            head = self.parse_head(params["head"])
        else:
            head = HeadSpec(identity=self.sample_identity(validate.seed(params.get("seed", 0))))
        return self.head_mesh(head, resolution, progress)

    def edit(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        progress = progress or NullProgress()
        validate.keys(params, {"head", "ops", "resolution"}, "edit")
        resolution = check_resolution(params.get("resolution", DEFAULT_RESOLUTION))
        head = self.parse_head(params.get("head"))
        new = edit.apply_ops(head, params.get("ops"), self.decode_regions, self.region_names, self.region_stats,
                             self.parse_head)
        out, mesh = self.head_mesh(new, resolution, progress)
        out["sliders"] = self.sliders(new)
        return out, mesh

    def fit(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        """Fit a head to a mesh or point cloud in any frame and units (docs: engine/align.py, engine/fit.py)."""
        from . import fit

        progress = progress or NullProgress()
        validate.keys(params, {"units", "resolution", "steps", "batch_points", "use_normals", "fit_expression",
                               "landmark_vertices", "landmark_regions", "seed", "samples"}, "fit")
        resolution = check_resolution(params.get("resolution", FIT_RESOLUTION))
        default_steps, default_batch, default_normals = FIT_BUDGET["cuda" if self.device.type == "cuda" else "cpu"]
        steps = validate.integer(params.get("steps", default_steps), "steps", 0, 5000)
        batch_points = validate.integer(params.get("batch_points", default_batch), "batch_points", 64, 65536)
        use_normals = params.get("use_normals", default_normals)
        n_samples = validate.integer(params.get("samples", FIT_SAMPLES), "samples", 100, 200_000)
        seed = validate.seed(params.get("seed", 0))
        fit_expression = params.get("fit_expression", True)
        if not isinstance(fit_expression, bool) or not isinstance(use_normals, bool):
            raise errors.InvalidInput("fit_expression and use_normals must be true or false")
        fixed_scale = fit.units_scale(params.get("units", "auto"))
        points = validate.float_array(arrays, "points", (None, 3)).astype(np.float64)
        faces = validate.index_array(arrays, "faces", len(points))
        normals = validate.float_array(arrays, "normals", (len(points), 3), required=False)
        landmarks = self._landmarks(params, arrays)
        rng = np.random.default_rng(seed)

        progress.report(0.0, "aligning")
        samples, sample_normals = fit.input_samples(points, faces, normals, n_samples, rng)
        sim, align_stats = self.aligner.align(samples, sample_normals, fixed_scale=fixed_scale, landmarks=landmarks,
                                              seed=seed)
        check_cancel(progress)
        x_model = sim.apply(samples)
        d_f, _ = self.aligner.tree.query(x_model)
        lo, hi = np.array(constants.BBOX_MIN), np.array(constants.BBOX_MAX)
        in_box = ((x_model > lo) & (x_model < hi)).all(1)  # the part of the input a head model describes
        inlier = (d_f <= max(2.5 * float(np.median(d_f)), 0.003)) & in_box
        if inlier.sum() < 50:
            raise errors.InvalidInput("could not find a head in the input (too few points near the aligned mean head)")
        pts = torch.as_tensor(x_model[inlier], device=self.device, dtype=torch.float32)
        nrm = None
        if sample_normals is not None and use_normals:
            n_model = sample_normals[inlier] @ sim.rotation.T
            nrm = torch.as_tensor(n_model, device=self.device, dtype=torch.float32)

        def callback(step: int, loss: torch.Tensor) -> None:  # loss stays on the device (no sync)
            check_cancel(progress)
            if step % 10 == 0:
                progress.report(0.1 + 0.7 * step / max(steps, 1), f"fitting latents: step {step}/{steps}")

        from ..model.inversion import fit_latents

        topk = FIT_TOPK.get(self.device.type, self.topk) if self.topk is not None else None
        result = fit_latents(self.model, pts, nrm, fit_expression=fit_expression, steps=steps,
                             id_mean=self.extras["id_mean"], id_chol=self.extras["id_chol"], topk=topk,
                             batch_points=batch_points, seed=seed, callback=callback,
                             point_ids=torch.as_tensor(np.flatnonzero(inlier)), final_abs=False)
        weights = result.z_exp[0].cpu().numpy()
        head = HeadSpec(identity=result.z_id[0].cpu().numpy().astype(np.float32),
                        expression={n: float(w) for n, w in zip(self.expression_names, weights) if w >= FIT_MIN_WEIGHT})
        check_cancel(progress)
        out, mesh = self.head_mesh(head, resolution, _Offset(progress, 0.8, 0.2))
        # measured on the input inside the model's box (a figure's body is not what the head model describes)
        err = fit.fit_error(x_model[in_box], mesh["vertices"], mesh["faces"], sim.scale)
        mesh["vertices"] = sim.inverse(mesh["vertices"].astype(np.float64)).astype(np.float32)
        mesh["normals"] = (mesh["normals"] @ sim.rotation).astype(np.float32)
        out.update({
            "error": err.to_dict(),
            "transform": sim.to_dict(),  # x_model = scale * rotation @ x_input + translation
            "alignment": {"score_m": align_stats.score, "forward_median_m": align_stats.forward_median,
                          "coverage_m": align_stats.coverage,
                          "hypotheses": align_stats.hypotheses, "inlier_fraction": float(inlier.mean()),
                          "in_box_fraction": float(in_box.mean())},
            "fit": {"steps": steps, "batch_points": batch_points, "normals": nrm is not None,
                    "final_loss": result.losses[-1] if result.losses else None},
        })
        return out, mesh

    def _landmarks(self, params: dict, arrays: dict) -> tuple[np.ndarray, np.ndarray] | None:
        ids, names = params.get("landmark_vertices"), params.get("landmark_regions")
        given = validate.float_array(arrays, "landmarks", (None, 3), required=False)
        if ids is None and names is None and given is None:
            return None
        if (ids is None) == (names is None) or given is None:
            raise errors.InvalidInput("landmarks need the 'landmarks' array and exactly one of "
                                      "'landmark_vertices' (template vertex ids) or 'landmark_regions' (names)")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise errors.InvalidInput("landmark_regions must be a list of region names")
            check_names(names, self.region_names, "region names")
            target = self.atlas.anchors[[self.region_names.index(n) for n in names]]
        else:
            if not isinstance(ids, list):
                raise errors.InvalidInput("landmark_vertices must be a list of template vertex ids")
            ids = [validate.integer(i, "landmark vertex id", 0, len(self.atlas.vertices) - 1) for i in ids]
            target = self.atlas.vertices[ids]
        if len(target) != len(given) or len(given) < 3:
            raise errors.InvalidInput(f"need at least 3 landmarks and as many ids as points "
                                      f"({len(target)} ids, {len(given)} points)")
        if np.linalg.matrix_rank(given - given.mean(0), tol=1e-9 * np.abs(given).max()) < 2:
            raise errors.InvalidInput("the landmarks are collinear")
        return given.astype(np.float64), target.astype(np.float64)

    def fit_capture(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        """A head, per-frame expressions and head pose from a photo or a video (backend/capture/op.py)."""
        from ..capture.op import run

        if arrays:
            raise errors.InvalidInput("fit_capture takes no arrays (the footage is read from 'path')")
        return run(self, params, progress or NullProgress())

    def deform(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        progress = progress or NullProgress()
        validate.keys(params, {"head", "exact_residual"}, "deform")
        head = self.parse_head(params.get("head"))
        exact = params.get("exact_residual", False)
        if not isinstance(exact, bool):
            raise errors.InvalidInput("exact_residual must be true or false")
        canonical = validate.float_array(arrays, "canonical", (None, 3))
        expr = validate.float_array(arrays, "expressions", (None, constants.N_EXPRESSIONS))
        if expr.min() < EXPRESSION_RANGE[0] or expr.max() > EXPRESSION_RANGE[1]:
            raise errors.InvalidInput(f"expression weights must lie in {list(EXPRESSION_RANGE)}")
        if len(canonical) * len(expr) > MAX_DEFORM_POINTS:
            raise errors.InvalidInput(f"{len(expr)} frames x {len(canonical)} vertices is more than "
                                      f"{MAX_DEFORM_POINTS} points per request; send fewer frames at a time")
        z_id, zr, k = self.decode(head)
        progress.report(0.0, f"deforming {len(canonical)} vertices through {len(expr)} frames")
        sdf_c = None if exact else self._cached_vertex_sdf(canonical, zr, k)
        res = self.pose(canonical, z_id, zr, k, expr, exact_residual=exact, canonical_sdf=sdf_c)
        progress.report(1.0, "done")
        out = {key: v for key, v in res.items() if key not in ("vertices", "residual", "converged")}
        return out, {"vertices": res["vertices"], "residual": res["residual"], "converged": res["converged"]}

    def _cached_vertex_sdf(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """vertex_sdf, remembered for the last few (mesh, head) pairs: the add-on sends one deform request per
        frame change of the same mesh, and at one frame per request the SDF would cost more than the solve."""
        import hashlib

        key = (hashlib.sha1(np.ascontiguousarray(canonical, np.float32).tobytes()).hexdigest(),
               hashlib.sha1(zr.detach().cpu().numpy().tobytes() + k.detach().cpu().numpy().tobytes()).hexdigest(),
               self.topk)
        cache = self._vertex_sdf_cache
        if key not in cache:
            while len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = self.vertex_sdf(canonical, zr, k)
        return cache[key]


@dataclass
class _Tape:
    """What Session._reverse needs from a forward pass: the points' offsets from the anchors (P,R,3), their
    lengths (P,R), the blend weights (P,R), and the local networks' record (the per-region loop's, with the
    folded first layers it ran with, or the batched all-regions pass's)."""

    diff: torch.Tensor | None = None
    dist: torch.Tensor | None = None
    w: torch.Tensor | None = None
    first: FirstLayer | None = None  # the folded first layers local_features ran with
    local: LocalRecord = field(default_factory=LocalRecord)  # sdf_eval.local_features' record
    dense: list[tuple] = field(default_factory=list)  # sdf_eval.dense_local_features' record, when it ran


class _ReverseWeights:
    """Per network slot, the transposed weights that carry a gradient back through a local network's layers, and
    the positional encoding's derivative (model/encoding.py's layout: x, sin(2^l pi x), cos(2^l pi x))."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.cfg
        with torch.no_grad():
            self.wo = [w.t().contiguous() for w in model.loc_wo]
            self.wh = [[wh[s].t().contiguous() for wh in model.loc_wh] for s in range(model.n_slots)]
            # each frequency's factor on the coordinate its sin / cos term encodes, (3 n_freqs, 3)
            freqs = (2.0 ** torch.arange(cfg.pe_freqs, dtype=model.loc_wx.dtype, device=model.loc_wx.device)) * math.pi
            self.freq_chain = torch.kron(freqs[:, None], torch.eye(3, dtype=freqs.dtype, device=freqs.device))
            # For the batched reverse of sdf_eval.dense_local_features, per region (R, ...): the first layer's
            # transposed weight with its columns as (x, cos terms, sin terms) and one zero column more, and
            # d(encoding)/d(x * pe_scale) in that order: the cos terms' column gradients times sin, then the sin
            # terms' times cos, weighted by -freq and +freq onto the coordinate they encode.
            n = 3 * cfg.pe_freqs
            order = [*range(3), *range(3 + n, 3 + 2 * n), *range(3, 3 + n)]
            slots = model.slot.tolist()
            wx = model.loc_wx[slots][:, order].transpose(1, 2)
            self.wx_r = torch.cat([wx, wx.new_zeros(*wx.shape[:2], 1)], 2)
            self.pe_chain = torch.cat([-self.freq_chain, self.freq_chain])
            self.wo_r = torch.stack([self.wo[s] for s in slots])
            self.wh_r = [torch.stack([self.wh[s][i] for s in slots]) for i in range(len(model.loc_wh))]


class _Offset:
    """A Progress that maps [0, 1] onto [start, start + span] of another."""

    def __init__(self, inner: Progress, start: float, span: float):
        self.inner, self.start, self.span = inner, start, span

    def report(self, fraction: float, message: str) -> None:
        self.inner.report(self.start + self.span * fraction, message)

    @property
    def cancelled(self) -> bool:
        return self.inner.cancelled


def extract_stats(stats: ExtractStats, dropped: float, topk: int | None) -> dict:
    return {
        "resolution": stats.resolution,
        "voxel_m": stats.voxel,
        "points_evaluated": stats.points_evaluated,
        "dense_points": stats.dense_points,
        "lipschitz": stats.lipschitz,
        "lipschitz_observed": stats.lipschitz_observed,
        "components_removed": stats.components_removed,
        "topk": topk,
        "max_dropped_blend_weight": dropped,
        "seconds": stats.seconds,
    }
