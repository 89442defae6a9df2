"""Expressions on a fixed topology: weights -> `deform` request -> vertex positions, without blocking.

Property updates and the frame_change_post handler only submit. Per object at most one deform is in
flight; changes arriving meanwhile are coalesced into one follow-up request with the latest weights.
Results are cached per object by their (rounded) weight vector, so scrubbing a keyframed timeline a second
time costs no requests. A change the backend could not take (stopped, restarting) is remembered and sent when
it is back (`resend_pending`). A render is the exception to never waiting: render_sync calls `pose_now` for
each frame it draws. Heads driven by shape keys (ARKit keys or a bake) are not posed live.
"""

from collections import OrderedDict
from functools import partial

import bpy
import numpy as np

from . import axes, expressions, mesh_build
from .client import payloads
from .properties import head_props

CACHE_ENTRIES = 256
KEY_DECIMALS = 4  # weights equal to 1e-4 give the same surface for all practical purposes
BAKED_PREFIX = "imhead_f"  # shape keys written by the bake, one per distinct pose


class _State:
    def __init__(self) -> None:
        self.in_flight: dict[str, bytes] = {}
        self.dirty: set[str] = set()
        self.shown: dict[str, bytes] = {}
        self.cache: dict[str, OrderedDict[bytes, np.ndarray]] = {}
        self.stats: dict[str, tuple[float, int]] = {}  # name -> (residual p99 in metres, non-converged)
        self.tokens: dict[str, tuple[int, int]] = {}  # name -> mesh identity the cache belongs to
        self.suspended = 0
        self.pending: set[str] = set()  # objects whose latest weights the backend could not take yet
        self.rendering = False


_state = _State()


def weights_of(obj: bpy.types.Object) -> np.ndarray:
    """The object's 53 weights (an evaluated copy gives the values animated in its depsgraph)."""
    values = head_props(obj).expressions
    return np.array([getattr(values, n) for n in expressions.EXPRESSION_NAMES], dtype=np.float32)


def weights_key(weights: np.ndarray) -> bytes:
    return np.round(np.asarray(weights, dtype=np.float64), KEY_DECIMALS).tobytes()


def is_baked(obj: bpy.types.Object) -> bool:
    """Shape keys (a bake or the ARKit keys) pose this head, not live deform."""
    keys = getattr(obj.data, "shape_keys", None)
    return keys is not None and len(keys.key_blocks) > 1


def request_for_object(obj: bpy.types.Object) -> None:
    """Show the object's current expression weights: from the cache, or by submitting one deform."""
    if _state.suspended or obj is None or obj.type != "MESH" or not head_props(obj).is_head or is_baked(obj):
        return
    if mesh_build.CANONICAL not in obj.data.attributes:
        return
    weights = weights_of(obj)
    key = weights_key(weights)
    name = obj.name
    token = _token(obj)
    if _state.tokens.get(name) != token:  # another mesh under this name (undo, rebuild, file load)
        forget(name)
        _state.tokens[name] = token
    if _state.shown.get(name) == key:
        return
    cached = _state.cache.get(name, OrderedDict()).get(key)
    if cached is None and not weights.any():
        # Neutral is the canonical surface itself: that is what generate/edit return and show.
        cached = mesh_build.read_point_vector(mesh_build.mesh_of(obj), mesh_build.CANONICAL)
    if cached is not None:
        mesh_build.set_positions(mesh_build.mesh_of(obj), cached)
        _state.shown[name] = key
        return
    if name in _state.in_flight:
        _state.dirty.add(name)
        return
    from . import backend_service

    _state.in_flight[name] = key  # before submitting: a request refused at once fails synchronously
    _state.pending.discard(name)
    try:
        _submit(obj, weights[None, :], partial(_apply_live, name, key), "Expression",
                on_failure=partial(_live_failed, name))
    except backend_service.BackendUnavailable:
        _forget_in_flight(name)
        _state.pending.add(name)
        raise


def _submit(obj: bpy.types.Object, weights: np.ndarray, on_success, label: str, on_failure=None) -> None:
    """One deform request for `obj`'s canonical vertices through `weights` (T,53)."""
    from . import backend_service, head_objects

    canonical = axes.blender_to_backend(mesh_build.read_point_vector(mesh_build.mesh_of(obj), mesh_build.CANONICAL))
    name = obj.name
    backend_service.submit(
        payloads.DeformRequest(head_objects.head_spec(obj), canonical, np.ascontiguousarray(weights, np.float32)),
        label=f"{label} ({name})", object_name=name, on_success=on_success, on_failure=on_failure)


def _token(obj: bpy.types.Object) -> tuple[int, int]:
    return len(obj.data.vertices), hash(head_props(obj).head_json)


def _forget_in_flight(name: str) -> None:
    _state.in_flight.pop(name, None)
    _state.dirty.discard(name)


def _live_failed(name: str, exc) -> None:
    """Died, restarted (its open requests end "cancelled") or refused: the mesh does not show the weights,
    so they are sent again when the backend is next started."""
    _forget_in_flight(name)
    _state.pending.add(name)


def resend_pending() -> None:
    """The backend is (re)started: show every head's weights that could not be sent before."""
    names, _state.pending = _state.pending, set()
    for name in sorted(names):
        obj = bpy.data.objects.get(name)
        if obj is not None:
            _state.shown.pop(name, None)
            request_for_object(obj)


def pending() -> set[str]:
    return set(_state.pending)


def _apply_live(name: str, key: bytes, params: dict, arrays: dict[str, np.ndarray]) -> None:
    _state.in_flight.pop(name, None)
    dirty = name in _state.dirty
    _state.dirty.discard(name)
    obj = bpy.data.objects.get(name)
    if obj is None or obj.type != "MESH":
        return
    if _state.tokens.get(name) == _token(obj):
        positions = _positions_from_reply(obj, arrays, frames=1)[0]
        _record_stats(name, arrays)
        _store(name, key, positions)
        if _state.rendering:
            return  # the render sets each frame's mesh itself (pose_now); the viewport catches up after it
        if weights_key(weights_of(obj)) == key:
            mesh_build.set_positions(mesh_build.mesh_of(obj), positions)
            _state.shown[name] = key
            return
    # The weights moved on (or the mesh changed) while this request ran: show the current ones.
    if dirty or _state.shown.get(name) != weights_key(weights_of(obj)):
        request_for_object(obj)


def _store(name: str, key: bytes, positions: np.ndarray) -> None:
    cache = _state.cache.setdefault(name, OrderedDict())
    cache[key] = positions
    while len(cache) > CACHE_ENTRIES:
        cache.popitem(last=False)


def _positions_from_reply(obj: bpy.types.Object, arrays: dict[str, np.ndarray], frames: int) -> np.ndarray:
    verts = np.asarray(arrays.get("vertices"))
    n = len(obj.data.vertices)
    if verts.shape != (frames, n, 3):
        raise ValueError(f"deform reply 'vertices' should be ({frames},{n},3), got {verts.shape}; "
                         "the mesh changed while the request was running")
    return axes.backend_to_blender(verts)


def _record_stats(name: str, arrays: dict[str, np.ndarray]) -> None:
    residual = arrays.get("residual")
    converged = arrays.get("converged")
    p99 = float(np.percentile(np.abs(residual), 99)) if residual is not None and residual.size else -1.0
    failed = int(np.count_nonzero(np.asarray(converged) == 0)) if converged is not None else -1
    _state.stats[name] = (p99, failed)


def stats(name: str) -> tuple[float, int] | None:
    return _state.stats.get(name)


def mark_shown(obj: bpy.types.Object) -> None:
    """The mesh already shows the object's current weights (e.g. a fit posed it): no request needed."""
    _state.tokens[obj.name] = _token(obj)
    _state.shown[obj.name] = weights_key(weights_of(obj))


def forget(name: str) -> None:
    """Drop cached results for an object whose mesh was replaced."""
    _state.cache.pop(name, None)
    _state.shown.pop(name, None)
    _state.stats.pop(name, None)
    _state.tokens.pop(name, None)


def reset() -> None:
    """Forget everything (a new file was loaded; its objects may reuse names)."""
    global _state
    _state = _State()


def set_rendering(on: bool) -> None:
    _state.rendering = on
    if not on:
        _state.shown.clear()  # the render left its last frame's pose on the meshes


class suspended:
    """Context manager: no live requests (while the bake operator steps through frames)."""

    def __enter__(self):
        _state.suspended += 1

    def __exit__(self, *exc):
        _state.suspended -= 1


@bpy.app.handlers.persistent
def on_undo_redo(scene: bpy.types.Scene, *_args) -> None:
    """Undo restores weights and vertex positions separately from our bookkeeping: show the weights anew
    (usually from the cache, so without a request)."""
    from . import backend_service

    _state.shown.clear()
    for obj in scene.objects:
        if getattr(obj, "type", None) == "MESH" and head_props(obj).is_head:
            try:
                request_for_object(obj)
            except backend_service.BackendUnavailable:
                return


@bpy.app.handlers.persistent
def on_frame_change(scene: bpy.types.Scene, depsgraph=None) -> None:
    """frame_change_post: animated weights are evaluated by now; submit only, never wait (a render's frame
    changes are render_sync's)."""
    from . import backend_service

    if _state.rendering or (depsgraph is not None and depsgraph.mode == "RENDER"):
        return
    for obj in scene.objects:
        if obj.type == "MESH" and head_props(obj).is_head:
            try:
                request_for_object(obj)
            except backend_service.BackendUnavailable:
                return  # the panel shows why; do not raise inside a handler on every frame


# --- frame weights --------------------------------------------------------------------------------------

def frame_weights(scene: bpy.types.Scene, obj: bpy.types.Object, frames: list[int]) -> np.ndarray:
    """(T,53) weights of `obj` at each frame, evaluated by stepping the scene (restores the frame)."""
    current = scene.frame_current
    out = np.empty((len(frames), len(expressions.EXPRESSION_NAMES)), dtype=np.float32)
    with suspended():
        try:
            for i, frame in enumerate(frames):
                scene.frame_set(frame)
                out[i] = weights_of(obj)
        finally:
            scene.frame_set(current)
    return out


# --- render ---------------------------------------------------------------------------------------------

def pose_now(obj: bpy.types.Object, weights: np.ndarray, timeout: float) -> None:
    """Put `weights` on the mesh before returning (a render is about to draw it): from the cache, the
    canonical surface, or one deform waited for. Raises BackendUnavailable, TimeoutError, BackendFailure."""
    from . import backend_service

    name, key = obj.name, weights_key(weights)
    if _state.tokens.get(name) != _token(obj):
        forget(name)
        _state.tokens[name] = _token(obj)
    positions = _state.cache.get(name, OrderedDict()).get(key)
    if positions is None and not weights.any():
        positions = mesh_build.read_point_vector(mesh_build.mesh_of(obj), mesh_build.CANONICAL)
    if positions is None:
        reply: dict = {}

        def keep(params: dict, arrays: dict[str, np.ndarray]) -> None:
            reply["arrays"] = arrays

        def failed(exc) -> None:
            reply["error"] = exc

        _submit(obj, weights[None, :], keep, "Render frame", on_failure=failed)
        backend_service.drain(timeout, until=lambda: bool(reply))
        if "error" in reply:
            raise reply["error"]
        positions = _positions_from_reply(obj, reply["arrays"], frames=1)[0]
        _store(name, key, positions)
    mesh_build.set_positions(mesh_build.mesh_of(obj), positions)
    _state.shown[name] = key
