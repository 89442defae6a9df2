"""The bake row of `python -m backend bench`: a 128^3 head's keyframed expressions over many frames, deformed as
the add-on's Bake sends them (chunks of BAKE_CHUNK_POINTS frame x vertex points, one `deform` op each)."""

from __future__ import annotations

import time

import numpy as np

from .bench import Row, _peak_mb, _reset_peak, _sync
from .head import HeadSpec

BAKE_CHUNK_POINTS = 262_144  # imhead_blender/deform_jobs.CHUNK_POINTS (a test keeps them equal)


def animation(frames: int, n_expressions: int, seed: int) -> np.ndarray:
    """(frames, n) smooth keyframe-like curves: each expression eases between random targets every 12 frames,
    a fifth of them active at a time (what a capture or hand animation looks like to the solver)."""
    rng = np.random.default_rng(seed)
    keys = np.arange(0, frames + 12, 12)
    targets = rng.uniform(0, 1, (len(keys), n_expressions)) * (rng.random((len(keys), n_expressions)) < 0.2)
    t = np.arange(frames)
    i = np.minimum(t // 12, len(keys) - 2)
    u = (t - keys[i]) / 12.0
    ease = u * u * (3 - 2 * u)
    return (targets[i] * (1 - ease)[:, None] + targets[i + 1] * ease[:, None]).astype(np.float32)


def bench_bake(session, frames: int, resolution: int = 128, seed: int = 0) -> Row:
    head = HeadSpec(session.sample_identity(seed))
    _, mesh = session.generate({"head": head.to_dict(), "resolution": resolution}, {})
    canonical = mesh["canonical"]
    weights = animation(frames, len(session.expression_names), seed)
    chunk = max(1, BAKE_CHUNK_POINTS // len(canonical))
    params = {"head": head.to_dict()}
    _reset_peak(session.device)
    p99, failed = 0.0, 0
    start = time.perf_counter()
    for s in range(0, frames, chunk):
        out, _arrays = session.deform(params, {"canonical": canonical, "expressions": weights[s : s + chunk]})
        p99, failed = max(p99, out["residual_p99_m"]), failed + out["non_converged"]
    _sync(session.device)
    seconds = time.perf_counter() - start
    detail = (f"{frames / seconds:.2f} frames/s, {frames} frames of {len(canonical)} verts in {seconds:.1f} s, "
              f"{chunk} frames per request, residual p99 <= {p99 * 1e3:.4f} mm, {failed} vertex-frames not converged")
    return Row("bake / frame", session.device.type, f"{resolution}^3, {frames} frames", seconds * 1e3 / frames,
               detail=detail, peak_mb=_peak_mb(session.device))
