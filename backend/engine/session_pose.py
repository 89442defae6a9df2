"""The session's pose path (engine/session.py): canonical vertices through expressions (`Session.pose`, the
`deform` op), the posed normals, and the vertex SDF with its per-(mesh, head) cache. Functions of the session;
`Session` keeps a method of each name, and they call one another through those methods."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import deform
from .progress import NullProgress, Progress
from .requests import DeformRequest
from .tuning import LIPSCHITZ, QUANTILE_MAX_VALUES, VERTEX_SDF_CACHE_SIZE

if TYPE_CHECKING:
    from .session import Session


def vertex_sdf(session: Session, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SDF (N,) at canonical vertices (N,3), on the session's device."""
    x_c = torch.as_tensor(canonical, device=session.device, dtype=torch.float32)
    sdf = session.sdf_fn(zr, k)
    chunk = session.chunk
    with torch.no_grad():
        return torch.cat([sdf(x_c[s : s + chunk]) for s in range(0, len(x_c), chunk)])


def vertex_sdf_path(session: Session, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """vertex_sdf and, from the same features, which vertices follow the expression path in pose (their
    template positions near the lips and lids: SurfaceOpener.path_points)."""
    x_c = torch.as_tensor(canonical, device=session.device, dtype=torch.float32)
    field = session.point_field(zr, k, session.residual_drop_tol)
    sdf, tmpl = [], []
    with torch.no_grad():
        for s in range(0, len(x_c), session.chunk):
            xs = x_c[s : s + session.chunk]
            value, feat, _ = field.field(xs)
            sdf.append(value)
            tmpl.append(session.model.template_from_features(xs, feat).cpu())
    template = torch.cat(tmpl).numpy() if tmpl else np.zeros((0, 3), np.float32)
    return torch.cat(sdf) if sdf else x_c.new_zeros(0), session.surface_opener.path_points(template)


def cached_sdf_path(session: Session, canonical: np.ndarray, zr: torch.Tensor, k: torch.Tensor
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """session.vertex_sdf_path, remembered in session._vertex_sdf_cache for the last VERTEX_SDF_CACHE_SIZE
    (mesh, head, topk) keys: the add-on sends one deform request per frame change of the same mesh, and at one
    frame per request the SDF would cost more than the solve."""
    key = (hashlib.sha1(np.ascontiguousarray(canonical, np.float32).tobytes()).hexdigest(),
           hashlib.sha1(zr.detach().cpu().numpy().tobytes() + k.detach().cpu().numpy().tobytes()).hexdigest(),
           session.topk)
    cache = session._vertex_sdf_cache
    if key not in cache:
        while len(cache) >= VERTEX_SDF_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = session.vertex_sdf_path(canonical, zr, k)
    return cache[key]


def pose(session: Session, canonical: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
         expressions: np.ndarray, exact_residual: bool, canonical_sdf: torch.Tensor | None = None) -> dict:
    """Deform canonical vertices (N,3) through expressions (T,53); residual = |posed-space SDF| at each
    moved vertex, i.e. |sdf(x + warp(x))| = |sdf(x_c + F)| with F = x + warp(x) - x_c the root finder's
    miss. Exact: evaluate it (T x N SDF evaluations). Otherwise its upper bound |sdf(x_c)| + L |F| (L the
    SDF's Lipschitz bound LIPSCHITZ; |F| <= 1 um where converged), which needs the SDF only once per
    canonical vertex, not per frame (canonical_sdf: that SDF, from vertex_sdf, when the caller has it).
    Frames with an all-zero expression vector are not solved (their warp is exactly zero: x = x_c).
    With session.frame_at_a_time each frame is solved as a one-frame request would solve it."""
    if session.frame_at_a_time and len(expressions) > 1:
        if canonical_sdf is None and not exact_residual:
            canonical_sdf = session.cached_vertex_sdf(canonical, zr, k)
        parts = [_solve(session, canonical, z_id, zr, k, expressions[i : i + 1], exact_residual, canonical_sdf)
                 for i in range(len(expressions))]
    else:
        parts = [_solve(session, canonical, z_id, zr, k, expressions, exact_residual, canonical_sdf)]
    vertices = torch.cat([p[0].vertices for p in parts])
    residual = torch.cat([p[1] for p in parts])
    conv = torch.cat([p[0].converged for p in parts])
    stats = {key: sum((p[0].stats or {})[key] for p in parts) for key in ("warp_points", "stopped_at_x0",
                                                                          "jacobian_points")}
    return {
        "vertices": vertices.cpu().numpy().astype(np.float32),
        "residual": residual.cpu().numpy().astype(np.float32),
        "converged": conv.cpu().numpy().astype(np.uint8),
        "non_converged": int((~conv).sum()),
        # the p99 of the first QUANTILE_MAX_VALUES vertex-frames
        "residual_p99_m": float(torch.quantile(residual.flatten()[:QUANTILE_MAX_VALUES].double(), 0.99)),
        "root_residual_max_m": max(float(p[0].root_residual.max()) for p in parts),
        "iterations": max(p[0].iterations for p in parts),
        # solver work: forward warps per vertex-frame (>= 2 where solved), vertex-frames done at x_c - warp(x_c),
        # and those that needed the exact (autograd) Jacobian
        "warp_evaluations_per_vertex_frame": stats["warp_points"] / max(residual.numel(), 1),
        "stopped_at_first_estimate": stats["stopped_at_x0"],
        "jacobian_vertex_frames": stats["jacobian_points"],
    }


def _solve(session: Session, canonical: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
           expressions: np.ndarray, exact_residual: bool, canonical_sdf: torch.Tensor | None
           ) -> tuple[deform.DeformResult, torch.Tensor]:
    """pose()'s solve of one batch of frames: the root finder's result and the (T, N) residual."""
    x_c = torch.as_tensor(canonical, device=session.device, dtype=torch.float32)
    e = torch.as_tensor(expressions, device=session.device, dtype=torch.float32)
    steps = deform.frame_continuation_steps(e)
    path = None
    # only the lips' and lids' vertices follow the path (see deform.solve_continued's path_points)
    if session.path_points_only and steps.numel() and int(steps.max()) > 1:
        if canonical_sdf is None and not exact_residual:
            canonical_sdf, path_np = session.vertex_sdf_path(canonical, zr, k)
        else:
            path_np = session.cached_path_points(canonical, zr, k)
        path = torch.as_tensor(path_np, device=session.device)
    # along the path 0 -> e (deform.solve_continued): where lips touch, a start at x_c finds the other lip's root
    result = deform.solve_continued(lambda t: session.warp_fn(z_id, e * t), x_c, e.shape[0], steps,
                                    path_points=path, refine=deform.REFINE_PATH, zero_frames=(e == 0).all(1))
    assert result.root_vector is not None and result.stats is not None  # deform.solve fills both
    chunk = session.chunk
    with torch.no_grad():
        if exact_residual:  # the canonical point x + warp(x) is x_c + F
            sdf = session.sdf_fn(zr, k)
            moved = (x_c[None] + result.root_vector).reshape(-1, 3)
            residual = torch.cat([sdf(moved[s : s + chunk]) for s in range(0, moved.shape[0], chunk)])
        else:
            sdf_c = session.vertex_sdf(canonical, zr, k) if canonical_sdf is None else canonical_sdf
            residual = sdf_c.abs()[None] + LIPSCHITZ * result.root_residual
    return result, residual.abs().view(e.shape[0], x_c.shape[0])


def posed_normals(session: Session, x: np.ndarray, z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor,
                  weights: np.ndarray) -> np.ndarray:
    """Outward normals of the posed surface: the gradient of sdf(x + warp(x)) at posed points."""
    e = torch.as_tensor(weights, device=session.device, dtype=torch.float32)[None]
    field = session.point_field(zr, k, session.point_drop_tol)
    out = []
    for s in range(0, len(x), session.grad_chunk):
        xt = torch.as_tensor(x[s : s + session.grad_chunk], device=session.device, dtype=torch.float32)
        with torch.enable_grad():
            xg = xt.clone().requires_grad_(True)
            xc = xg + session.model.warp(xg[None], e, z_id)[0]
            (g,) = torch.autograd.grad(field.sdf(xc).sum(), xg)
        out.append(g)
    grad = torch.cat(out).cpu().numpy()
    return (grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def deform_op(session: Session, params: dict, arrays: dict, progress: Progress | None = None
              ) -> tuple[dict, dict]:
    """The `deform` op: a mesh's canonical vertices through per-frame expressions (docs/protocol.md)."""
    progress = progress or NullProgress()
    req = DeformRequest.parse(params, arrays, session.parse_head)
    canonical, expr = req.canonical, req.expressions
    z_id, zr, k = session.decode(req.head)
    progress.report(0.0, f"deforming {len(canonical)} vertices through {len(expr)} frames")
    sdf_c = None if req.exact_residual else session.cached_vertex_sdf(canonical, zr, k)
    res = session.pose(canonical, z_id, zr, k, expr, exact_residual=req.exact_residual, canonical_sdf=sdf_c)
    progress.report(1.0, "done")
    out = {key: v for key, v in res.items() if key not in ("vertices", "residual", "converged")}
    return out, {"vertices": res["vertices"], "residual": res["residual"], "converged": res["converged"]}
