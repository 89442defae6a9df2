"""Engine session: loads the model once and answers the server's operations (docs/architecture.md).

Every op takes (params: dict, arrays: dict[str, np.ndarray], progress) and returns (params, arrays). Their
requests are checked by engine/requests.py, the head's field at points is engine/point_field.py, the pose path
(pose, deform, the vertex-SDF cache) is engine/session_pose.py, and the tuning constants are engine/tuning.py."""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .. import __version__, constants, errors
from ..cpu import thread_map, thread_slices
from ..data.atlas import load_atlas
from ..weights import load_model
from . import deform, edit, open_surface, session_pose
from .extract import CoarseSdf, ExtractStats, Mesh, extract_mesh
from .handle_repair import Parted
from .head import HeadSpec
from .point_field import PointField
from .progress import NullProgress, Progress, check_cancel
from .requests import EditRequest, GenerateRequest
from .sdf_eval import HeadSdf
from .sdf_reverse import ReverseWeights
from .template import TemplateIndex, seam_faces
from .tuning import (ALIGN_TEMPLATE_SAMPLES, CHUNKS, EXTRACT_CHUNKS, EXTRACT_COARSE_ERROR, EXTRACT_DROP_TOL,
                     EXTRACT_EXACT_BELOW, EXTRACT_HALF, EXTRACT_HALF_EXACT_BELOW, EXTRACT_LIPSCHITZ, EXTRACT_MODE,
                     FRAME_AT_A_TIME, GRAD_CHUNKS, PATH_POINTS, POINT_DROP_TOL, RESIDUAL_DROP_TOL, TOPK,
                     WARM_UP_POSE_VERTICES, WARM_UP_RESOLUTION, WARP_CHUNKS, for_device)

if TYPE_CHECKING:  # fit and align load scipy: imported where fitting needs them, not by the handshake
    from .align import Aligner

# Where each stage of an operation starts on its progress bar (fractions of the whole op).
PROGRESS_EXTRACT = 0.05
PROGRESS_ATTRIBUTES = 0.5
PROGRESS_POSE = 0.75
WARM_UP_EXPRESSION_WEIGHT = 0.5  # the warm-up pose: the first expression at this weight


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
    def __init__(self, weights_dir: Path | None = None, device: str = "auto", allow_untrained: bool = False):
        self.device = resolve_device(device)
        kind = self.device.type
        self.chunk = for_device(CHUNKS, kind)
        self.grad_chunk = for_device(GRAD_CHUNKS, kind)
        self.topk: int | None = TOPK  # None: every point through all 39 local networks
        self.point_drop_tol = for_device(POINT_DROP_TOL, kind)  # see point_field
        self.residual_drop_tol = for_device(RESIDUAL_DROP_TOL, kind)
        self.extract_mode = for_device(EXTRACT_MODE, kind)  # sdf_eval.HeadSdf mode for meshes
        self.extract_half = for_device(EXTRACT_HALF, kind)
        # the attribute pass through every region (no tolerance) as batched products over the region axis
        self.dense_attributes = kind == "cuda"
        self.frame_at_a_time = for_device(FRAME_AT_A_TIME, kind)
        self.path_points_only = for_device(PATH_POINTS, kind)  # deform: the path for the lips' and lids' vertices only
        self.loaded = load_model(weights_dir, str(self.device), allow_untrained)
        self.model = self.loaded.model.eval().requires_grad_(False)
        self._slots: list[int] = self.model.slot.tolist()  # region -> local network (no device sync per use)
        self.extras = self.loaded.extras
        atlas_path = Path(weights_dir) / "atlas.safetensors" if weights_dir is not None else None
        self.atlas = load_atlas(atlas_path if atlas_path is not None and atlas_path.exists() else None)
        self._template_index: TemplateIndex | None = None
        self._aligner: Aligner | None = None
        self._vertex_sdf_cache: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}  # see cached_vertex_sdf
        self.open_surfaces = True  # False: meshes as extracted (closed lips, the model's own neck bottom)
        self.repair_handles = True  # False: no handle removal on the sign lattice (engine/handle_repair.py)

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

    @cached_property
    def surface_opener(self) -> open_surface.SurfaceOpener:
        return open_surface.SurfaceOpener(self.atlas)

    @property
    def aligner(self) -> Aligner:
        if self._aligner is None:
            from . import fit
            from .align import Aligner

            self._aligner = Aligner(*fit.template_surface(self.atlas, ALIGN_TEMPLATE_SAMPLES))
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
        keys = ("region_mean", "region_dirs", "region_std")
        return edit.RegionStats(*(e[key].double().cpu().numpy() for key in keys))

    def sliders(self, head: HeadSpec) -> dict[str, list[float]]:
        """Every region's slider positions (std units along its principal directions)."""
        codes = edit.effective_codes(head, self.decode_regions, self.region_names)
        stats = self.region_stats
        return {n: [float(v) for v in stats.coords(j, codes[j])] for j, n in enumerate(self.region_names)}

    def decode_params(self, data: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(self.parse_head(data))

    # ------------------------------------------------------------------ network evaluation
    def point_field(self, zr: torch.Tensor, k: torch.Tensor, tol: float | None) -> PointField:
        """The head's field at points, leaving out at most `tol` blend mass per point (None, or self.topk None:
        all 39 regions)."""
        return PointField(self.model, self._slots, self._reverse_weights, zr, k,
                          tol if self.topk is not None else None, self.dense_attributes)

    @cached_property
    def _reverse_weights(self) -> ReverseWeights:
        return ReverseWeights(self.model)

    def sdf_fn(self, zr: torch.Tensor, k: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The SDF as deform residuals evaluate it (RESIDUAL_DROP_TOL)."""
        return self.point_field(zr, k, self.residual_drop_tol).sdf

    def canonical_mesh(self, zr: torch.Tensor, k: torch.Tensor, resolution: int, samples: list | None = None,
                       repair: bool = False, parted: Parted | None = None) -> tuple[Mesh, ExtractStats, float]:
        """Extract the canonical (neutral) surface; also returns the largest blend-weight mass left out.
        self.topk None: all 39 regions everywhere on every device. `repair`: small handles removed
        (engine/handle_repair.py), with no cut where `parted` (world points -> bool) says the opener parts them."""
        mode = "dense" if self.topk is None else self.extract_mode
        half = self.extract_half and mode == "dense"
        fn = HeadSdf(self.model, zr, k, mode=mode, drop_tol=EXTRACT_DROP_TOL,
                     exact_below=EXTRACT_HALF_EXACT_BELOW if half else EXTRACT_EXACT_BELOW,
                     hidden_dtype=torch.float16 if half else torch.float32)
        coarse = CoarseSdf(fn.approximate, EXTRACT_COARSE_ERROR, fn.exact_below) if fn.is_approximate else None
        mesh, stats = extract_mesh(fn, resolution, device=self.device, lipschitz=EXTRACT_LIPSCHITZ,
                                   chunk=for_device(EXTRACT_CHUNKS, self.device.type), samples=samples, coarse=coarse,
                                   repair=repair, parted=parted)
        return mesh, stats, fn.max_dropped

    def sdf_grad_template(self, x: np.ndarray, zr: torch.Tensor, k: torch.Tensor
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """At canonical points (N,3): SDF (N,), its gradient (N,3) (one reverse pass, PointField.field_grad), the
        template position (N,3) from the same features, and the largest blend mass left out. On CPU the chunks
        run on parallel threads (cpu.thread_map, as extraction's evaluations)."""
        field = self.point_field(zr, k, self.point_drop_tol)

        def run(s: slice) -> tuple[torch.Tensor, ...]:
            xt = torch.as_tensor(x[s], device=self.device, dtype=torch.float32)
            sdf, grad, feat, dropped = field.field_grad(xt)
            with torch.no_grad():
                tmpl = self.model.template_from_features(xt, feat)
            return sdf, grad, tmpl, torch.tensor([dropped])

        if self.device.type == "cpu":
            parts = thread_map(run, thread_slices(len(x), self.grad_chunk))
        else:
            parts = [run(slice(s, s + self.grad_chunk)) for s in range(0, max(len(x), 1), self.grad_chunk)]
        sdf, grad, tmpl, chunk_dropped = (torch.cat(p).cpu().numpy() for p in zip(*parts))
        return sdf, grad, tmpl, max(0.0, float(chunk_dropped.max()))

    def warp_fn(self, z_id: torch.Tensor, expressions: torch.Tensor) -> deform.WarpFn:
        """Per-point backward warp for frame-indexed expressions (T,53) (per-frame constants folded in)."""
        return deform.model_warp(self.model, z_id, expressions, for_device(WARP_CHUNKS, self.device.type))

    # ------------------------------------------------------------------ meshes
    def head_mesh(self, head: HeadSpec, resolution: int, progress: Progress) -> tuple[dict, dict]:
        """Canonical mesh of a head with every attribute, posed by the head's expression."""
        z_id, zr, k = self.decode(head)
        progress.report(PROGRESS_EXTRACT, "extracting the surface")
        # where the opener's expressions part the surface (the lips' contact) its slit opens it, not a repair cut
        parted: Parted | None = None
        if self.open_surfaces:
            parted = partial(open_surface.parted, open_surface.ExpressionMotion(self, z_id).solved)
        mesh, ext, dropped = self.canonical_mesh(zr, k, resolution, repair=self.repair_handles, parted=parted)
        if len(mesh.faces) == 0:
            raise errors.BackendError("the model produced no surface inside the canonical box", code="empty_surface")
        check_cancel(progress)
        progress.report(PROGRESS_ATTRIBUTES, "attributes")
        arrays, attr_stats = self.attributes(mesh, zr, k)
        stats = extract_stats(ext, dropped, self.topk) | attr_stats
        if self.open_surfaces:  # neck cut, one piece, lips and upper lids slit (engine/open_surface.py)
            arrays, stats["surface"] = open_surface.open_head(self, arrays, z_id, zr, k)
        weights = head.expression_vector(self.expression_names)
        if np.any(weights != 0):
            check_cancel(progress)
            progress.report(PROGRESS_POSE, "posing")
            # the vertex SDF is remembered: the add-on's deform requests for this mesh and head skip it
            canonical = arrays["canonical"]
            res = self.pose(canonical, z_id, zr, k, weights[None], exact_residual=False,
                            canonical_sdf=self.cached_vertex_sdf(canonical, zr, k))
            arrays["vertices"] = res["vertices"][0]
            arrays["normals"] = self.posed_normals(res["vertices"][0], z_id, zr, k, weights)
            stats["deform"] = {key: v for key, v in res.items() if key not in ("vertices", "residual", "converged")}
        progress.report(1.0, "done")
        return {"head": head.to_dict(), "stats": stats}, arrays

    def attributes(self, mesh: Mesh, zr: torch.Tensor, k: torch.Tensor) -> tuple[dict, dict]:
        sdf, grad, tmpl, dropped = self.sdf_grad_template(mesh.vertices, zr, k)
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
            "vertex_max_dropped_blend_weight": dropped,
        }
        return arrays, stats

    # the pose path: engine/session_pose.py (the functions' docstrings say what each does)
    def vertex_sdf(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """SDF (N,) at canonical vertices (N,3), on the session's device."""
        return session_pose.vertex_sdf(self, canonical, zr, k)

    def vertex_sdf_path(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor
                        ) -> tuple[torch.Tensor, np.ndarray]:
        """vertex_sdf and which vertices follow the expression path in pose (SurfaceOpener.path_points)."""
        return session_pose.vertex_sdf_path(self, canonical, zr, k)

    def cached_vertex_sdf(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """vertex_sdf, remembered for the last few (mesh, head) pairs: the add-on sends one deform request per
        frame change of the same mesh, and at one frame per request the SDF would cost more than the solve."""
        return session_pose.cached_sdf_path(self, canonical, zr, k)[0]

    def cached_path_points(self, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> np.ndarray:
        """vertex_sdf_path's path points, remembered with cached_vertex_sdf."""
        return session_pose.cached_sdf_path(self, canonical, zr, k)[1]

    def pose(self, canonical: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
             expressions: np.ndarray, exact_residual: bool, canonical_sdf: torch.Tensor | None = None) -> dict:
        """Deform canonical vertices (N,3) through expressions (T,53): posed vertices, residuals, solver stats."""
        return session_pose.pose(self, canonical, z_id, zr, k, expressions, exact_residual, canonical_sdf)

    def posed_normals(self, x: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
                      weights: np.ndarray) -> np.ndarray:
        """Outward normals of the posed surface: the gradient of sdf(x + warp(x)) at posed points."""
        return session_pose.posed_normals(self, x, z_id, zr, k, weights)

    # ------------------------------------------------------------------ ops
    def warm_up(self) -> None:
        """Pay a first request's one-off costs now (the server calls this after the handshake): a small head
        through generate (the template index, first-call allocations; on CUDA the Triton
        kernels compile or load from their cache) and a short pose of some of its vertices (the warp network)."""
        head = HeadSpec(identity=self.sample_identity(0))
        z_id, zr, k = self.decode(head)
        _, arrays = self.head_mesh(head, for_device(WARM_UP_RESOLUTION, self.device.type), NullProgress())
        weights = np.zeros((1, len(self.expression_names)), np.float32)
        weights[0, 0] = WARM_UP_EXPRESSION_WEIGHT
        self.pose(arrays["canonical"][:WARM_UP_POSE_VERTICES], z_id, zr, k, weights, exact_residual=False)

    def generate(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        request = GenerateRequest.parse(params, self.parse_head)
        head = request.head
        if head is None:
            assert request.seed is not None  # GenerateRequest.parse sets one of the two
            head = HeadSpec(identity=self.sample_identity(request.seed))
        out, mesh = self.head_mesh(head, request.resolution, progress or NullProgress())
        out["sliders"] = self.sliders(head)  # the region sliders' positions, so no separate load step
        return out, mesh

    def edit(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        request = EditRequest.parse(params, self.parse_head)
        new = edit.apply_ops(request.head, request.ops, self.decode_regions, self.region_names, self.region_stats,
                             self.parse_head)
        out, mesh = self.head_mesh(new, request.resolution, progress or NullProgress())
        out["sliders"] = self.sliders(new)
        return out, mesh

    def fit(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        """Fit a head to a mesh or point cloud in any frame and units (engine/fit_op.py)."""
        from .fit_op import fit_head  # fitting loads scipy: imported where it is needed, not by the handshake

        return fit_head(self, params, arrays, progress or NullProgress())

    def fit_capture(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        """A head, per-frame expressions and head pose from a photo or a video (backend/capture/op.py)."""
        from ..capture.op import run

        if arrays:
            raise errors.InvalidInput("fit_capture takes no arrays (the footage is read from 'path')")
        return run(self, params, progress or NullProgress())

    def deform(self, params: dict, arrays: dict, progress: Progress | None = None) -> tuple[dict, dict]:
        return session_pose.deform_op(self, params, arrays, progress)


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
    } | ({"handle_repair": stats.handle_repair} if stats.handle_repair else {})
