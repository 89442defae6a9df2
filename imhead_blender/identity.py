"""Global identity sliders: the leading principal directions of the model's identity-code distribution
(covariance id_chol id_chol^T from the shipped weights' extras), in standard deviations, named by the dimension
each changes most (weights/identity_directions.json, measured by tools/name_identity_directions.py for these
weights; other weights get plain "Identity N" names). Also the code statistics the region sliders' Symmetric
editing needs (region principal directions and standard deviations).

Moving a slider sets the head's identity coordinates along those directions (the rest of the code is kept)
and rebuilds the mesh with `generate`; per object one request is in flight and later moves are coalesced into
one follow-up, as for region edits. Keyframed sliders are applied on frame change.
"""

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache, partial

import bpy
import numpy as np

from . import backend_service, head_objects, preferences, safetensors_read
from .client import payloads
from .properties import head_props

COUNT = 12  # sliders (the first 12 directions hold 74% of the shipped identity variance)
NAMES_FILE = "identity_directions.json"
_EXTRAS = ("extras.id_chol", "extras.id_mean", "extras.region_dirs", "extras.region_std")


@dataclass(frozen=True)
class Stats:
    mean: np.ndarray  # (256,)
    chol: np.ndarray  # (256,256): z = mean + chol @ n, n ~ N(0, I)
    dirs: np.ndarray  # (COUNT,256) unit rows, oriented so that + grows the named dimension
    sigma: np.ndarray  # (COUNT,)
    names: tuple[str, ...]
    region_dirs: np.ndarray  # (39,32,32)
    region_std: np.ndarray  # (39,32)


@lru_cache(maxsize=1)
def stats() -> Stats:
    """Raises ValueError when the weights cannot be read."""
    folder = preferences.backend_root() / "weights"
    arrays, _meta = safetensors_read.read(folder / "imhead.safetensors", set(_EXTRAS))
    missing = [k for k in _EXTRAS if k not in arrays]
    if missing:
        raise ValueError(f"the weights lack {missing}")
    chol = arrays["extras.id_chol"].astype(np.float64)
    w, v = np.linalg.eigh(chol @ chol.T)
    order = np.argsort(w)[::-1][:COUNT]
    dirs = v[:, order].T
    dirs *= np.sign(dirs[np.arange(COUNT), np.abs(dirs).argmax(1)])[:, None]  # as the naming tool does
    names = [f"Identity {i + 1}" for i in range(COUNT)]
    named = _measured_names(folder)
    for i, entry in enumerate(named[:COUNT]):
        names[i] = str(entry["name"])
        dirs[i] *= 1 if entry.get("sign", 1) > 0 else -1
    return Stats(arrays["extras.id_mean"].astype(np.float64), chol, dirs, np.sqrt(np.maximum(w[order], 0.0)),
                 tuple(names), arrays["extras.region_dirs"].astype(np.float64),
                 np.maximum(arrays["extras.region_std"].astype(np.float64), 1e-12))


def _measured_names(folder) -> list[dict]:
    path = folder / NAMES_FILE
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        digest = hashlib.sha256((folder / "imhead.safetensors").read_bytes()).hexdigest()
    except (OSError, ValueError):
        return []
    return list(doc.get("directions", [])) if doc.get("weights_sha256") == digest else []


def coordinates(identity: np.ndarray) -> np.ndarray:
    s = stats()
    return s.dirs @ (np.asarray(identity, np.float64) - s.mean) / s.sigma


def with_coordinates(identity: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The identity with its coordinates along the slider directions set to `coords` (the rest kept)."""
    s = stats()
    delta = (np.asarray(coords, np.float64) - coordinates(identity)) * s.sigma
    return (np.asarray(identity, np.float64) + delta @ s.dirs).astype(np.float32)


def random_identity(strength: float, rng: np.random.Generator) -> np.ndarray:
    """A draw from the model's identity distribution, `strength` standard deviations wide (0: the mean)."""
    s = stats()
    return (s.mean + strength * (s.chol @ rng.standard_normal(len(s.mean)))).astype(np.float32)


def mirrored_delta(region: int, partner: int, delta: np.ndarray) -> np.ndarray:
    """Slider change of `partner` that applies the same code change as `delta` on `region` (mirror pairs share
    one network through x -> -x, so the same code change is the mirrored shape change)."""
    s = stats()
    n = len(delta)
    code = (np.asarray(delta, np.float64) * s.region_std[region, :n]) @ s.region_dirs[region, :n]
    return (s.region_dirs[partner] @ code / s.region_std[partner])[:n]


# --- requests --------------------------------------------------------------------------------------------

class _State:
    def __init__(self) -> None:
        self.in_flight: set[str] = set()
        self.dirty: set[str] = set()
        self.applying = 0


_state = _State()


def reset() -> None:
    global _state
    _state = _State()


def busy(name: str) -> bool:
    return name in _state.in_flight


def store(obj: bpy.types.Object) -> None:
    """Show the stored identity's coordinates on the sliders (after a generate, edit or fit)."""
    try:
        coords = coordinates(head_objects.head_spec(obj)["identity"])
    except ValueError:
        return
    _state.applying += 1
    try:
        head_props(obj).identity = [float(c) for c in coords]
    finally:
        _state.applying -= 1


def request(obj: bpy.types.Object) -> None:
    """The sliders moved (by hand or by animation): rebuild the head when they differ from its identity."""
    if _state.applying or obj is None or not head_props(obj).is_head:
        return
    name = obj.name
    spec = head_objects.head_spec(obj)
    wanted = np.array(head_props(obj).identity, np.float64)
    if np.abs(wanted - coordinates(spec["identity"])).max() < 1e-4:
        return
    if name in _state.in_flight:
        _state.dirty.add(name)
        return
    spec["identity"] = with_coordinates(np.asarray(spec["identity"]), wanted).tolist()
    submit(obj, spec, "Identity sliders")


def submit(obj: bpy.types.Object, spec: dict, label: str) -> None:
    """Rebuild `obj` from `spec`; raises BackendUnavailable (callers in property updates swallow it)."""
    name = obj.name
    _state.in_flight.add(name)
    try:
        backend_service.submit(payloads.GenerateRequest(head=spec, resolution=head_props(obj).resolution),
                               label=f"{label} ({name})", object_name=name, on_success=partial(_apply, name),
                               on_failure=lambda _exc: _done(name))
    except backend_service.BackendUnavailable:
        _done(name)
        raise


def _done(name: str) -> None:
    _state.in_flight.discard(name)
    _state.dirty.discard(name)


def _apply(name: str, params: dict, arrays: dict) -> None:
    from . import region_edit

    _state.in_flight.discard(name)
    dirty = name in _state.dirty
    _state.dirty.discard(name)
    obj = bpy.data.objects.get(name)
    if obj is None:
        return
    wanted = list(head_props(obj).identity)
    head_objects.replace_head_mesh(obj, params["head"], arrays)
    region_edit.store_sliders(obj, params.get("sliders"))
    if dirty:
        head_props(obj).identity = wanted  # its update submits the follow-up
    else:
        store(obj)


def on_update(self, context) -> None:
    try:
        request(self.id_data)
    except (backend_service.BackendUnavailable, ValueError):
        pass  # the panel's status box says why; a property update cannot report


@bpy.app.handlers.persistent
def on_frame_change(scene: bpy.types.Scene, depsgraph=None) -> None:
    """Keyframed identity sliders: rebuild the heads whose animated values differ from their identity."""
    for obj in scene.objects:
        if obj.type == "MESH" and head_props(obj).is_head and _animates_identity(obj):
            try:
                request(obj)
            except (backend_service.BackendUnavailable, ValueError):
                return


def _animates_identity(obj: bpy.types.Object) -> bool:
    anim = obj.animation_data
    return anim is not None and anim.action is not None and any(
        fc.data_path == "imhead.identity" for fc in _fcurves(anim.action))


def _fcurves(action):
    curves = getattr(action, "fcurves", None)
    if curves is not None:
        return list(curves)
    out = []  # Blender 5 layered actions: layers > strips > channelbags
    for layer in getattr(action, "layers", []):
        for strip in layer.strips:
            for bag in getattr(strip, "channelbags", []):
                out.extend(bag.fcurves)
    return out
