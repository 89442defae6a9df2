"""Long deforms (a bake, the ARKit shape keys) as a chain of `deform` requests, one chunk of frames at a time.

A request carries at most CHUNK_POINTS frame x vertex points (at least one frame), so any frame range and mesh
size fits the backend's per-request limit, the panel and the status bar show frames done / total as chunks
return, and Cancel stops the chain at once (the request in flight is cancelled, nothing is applied). Per object
at most one chain runs; its result is handed to `on_complete(obj, positions)` in one piece on the main thread.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import bpy
import numpy as np

from . import axes, backend_service, mesh_build
from .client import payloads
from .properties import head_props

# Points (frames x vertices) per request: a few seconds on 2 CPU cores (docs/benchmarks.md, "Engine tuning", has
# the measurement and the bake rates), a small fraction of the backend's 20M limit.
CHUNK_POINTS = 262_144

OnComplete = Callable[[bpy.types.Object, np.ndarray], None]


@dataclass
class Chain:
    name: str
    label: str
    weights: np.ndarray            # (T,53) every frame to compute
    canonical: np.ndarray          # (N,3) canonical vertices in backend axes
    head: dict
    token: tuple[int, str]
    on_complete: OnComplete
    chunk: int
    done: int = 0
    results: list[np.ndarray] = field(default_factory=list)
    job: backend_service.Job | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return len(self.weights)


_chains: dict[str, Chain] = {}


def _token(obj: bpy.types.Object) -> tuple[int, str]:
    return len(obj.data.vertices), head_props(obj).head_json


def chunk_frames(vertices: int) -> int:
    return max(1, CHUNK_POINTS // max(vertices, 1))


def start(obj: bpy.types.Object, weights: np.ndarray, label: str, on_complete: OnComplete) -> Chain:
    """Deform `obj`'s canonical vertices through every row of `weights` (T,53). Raises RuntimeError when a
    chain already runs for the object, BackendUnavailable when the backend cannot take it."""
    from . import head_objects

    if obj.name in _chains:
        raise RuntimeError(f"'{obj.name}' is already being baked ({_chains[obj.name].label}); cancel it first")
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.ndim != 2 or len(weights) == 0:
        raise ValueError(f"weights must be (T,53) with T > 0, got {weights.shape}")
    canonical = axes.blender_to_backend(mesh_build.read_point_vector(mesh_build.mesh_of(obj), mesh_build.CANONICAL))
    chain = Chain(obj.name, label, weights, canonical, head_objects.head_spec(obj), _token(obj), on_complete,
                  chunk_frames(len(canonical)))
    _chains[obj.name] = chain
    try:
        _submit_next(chain)
    except backend_service.BackendUnavailable:
        _chains.pop(obj.name, None)
        raise
    _show_status()
    return chain


def _submit_next(chain: Chain) -> None:
    part = chain.weights[chain.done : chain.done + chain.chunk]
    chain.job = backend_service.submit(
        payloads.DeformRequest(chain.head, chain.canonical, part),
        label=f"{chain.label} ({chain.name}): {chain.done}/{chain.total} frames", object_name=chain.name,
        on_success=lambda params, arrays: _chunk_done(chain, arrays),
        on_failure=lambda exc: _failed(chain, exc))


def _chunk_done(chain: Chain, arrays: dict[str, np.ndarray]) -> None:
    if _chains.get(chain.name) is not chain:
        return  # cancelled meanwhile
    expected = (min(chain.chunk, chain.total - chain.done), len(chain.canonical), 3)
    verts = np.asarray(arrays.get("vertices"))
    if verts.shape != expected:
        _end(chain)
        raise ValueError(f"deform reply 'vertices' should be {expected}, got {verts.shape}")
    chain.results.append(verts)
    chain.done += expected[0]
    if chain.done < chain.total:
        try:
            _submit_next(chain)
        except backend_service.BackendUnavailable as exc:
            _end(chain)
            print(f"[imhead] {chain.label} stopped: {exc}", file=sys.stderr)
        _show_status()
        return
    _end(chain)
    obj = bpy.data.objects.get(chain.name)
    if obj is None or obj.type != "MESH" or _token(obj) != chain.token:
        print(f"[imhead] {chain.label}: '{chain.name}' changed while it ran; nothing applied", file=sys.stderr)
        return
    chain.on_complete(obj, axes.backend_to_blender(np.concatenate(chain.results)))


def _failed(chain: Chain, exc) -> None:
    if _chains.get(chain.name) is chain:
        _end(chain)


def _end(chain: Chain) -> None:
    if _chains.get(chain.name) is chain:
        del _chains[chain.name]
    chain.job = None
    _show_status()


def cancel(name: str) -> bool:
    """Stop the object's chain: the request in flight is cancelled and nothing is applied."""
    chain = _chains.pop(name, None)
    if chain is None:
        return False
    if chain.job is not None:
        backend_service.cancel(chain.job.request_id)
    _show_status()
    return True


def running(name: str | None = None) -> list[Chain]:
    return [c for c in _chains.values() if name is None or c.name == name]


def reset() -> None:
    _chains.clear()


def status_text() -> str:
    return "   ".join(f"imHead {c.label} {c.name}: {c.done}/{c.total} frames" for c in _chains.values())


def _show_status() -> None:
    """Frames done / total in the status bar while chains run (cleared when the last one ends)."""
    workspace = getattr(bpy.context, "workspace", None)
    if workspace is not None:
        text = status_text()
        workspace.status_text_set(text or None)
