"""Region edits (backend `edit` op: set/swap/blend/randomise/pca/reset on region codes) and the per-region
sliders, kept in step with the backend's slider positions.

An edit re-extracts the mesh, so per object at most one edit is in flight; slider moves arriving meanwhile
are collected and sent as one follow-up. The reply replaces the object's mesh (transform kept) and
refreshes the sliders of every region the user has not touched since.
"""

from functools import partial

import bpy
import numpy as np

from . import backend_service, head_objects, undo
from .client import payloads
from .properties import SLIDER_RANGE as SLIDER_LIMIT, head_props

LOST_WITH_THE_PROCESS = ("backend_died", "cancelled")  # failure codes after which an edit is sent again


class _State:
    def __init__(self) -> None:
        self.in_flight: set[str] = set()
        self.dirty: dict[str, set[str]] = {}  # object -> regions whose sliders moved while in flight
        # object -> {region: sliders} as the backend last confirmed them, i.e. matching the mesh; a failed edit
        # (backend crash, cancel, refusal) puts the sliders back to these
        self.confirmed: dict[str, dict[str, list[float]]] = {}
        self.applying = 0  # >0 while sliders are written from a reply (no requests then)
        self.pending: dict[str, set[str]] = {}  # object -> regions the backend could not take (restarting)
        self.sent: dict[str, dict[str, tuple[float, ...]]] = {}  # object -> region -> slider values sent/shown


_state = _State()


def reset() -> None:
    global _state
    _state = _State()


def busy(name: str) -> bool:
    return name in _state.in_flight


def submit_edit(obj: bpy.types.Object, ops: list[dict], label: str, head: dict | None = None,
                retry_regions: set[str] | frozenset[str] = frozenset(), undo_step: bool = True) -> backend_service.Job:
    """Send `ops` for this head (or for `head`, e.g. a blend's base); raises BackendUnavailable (the caller
    reports it). `retry_regions`: slider regions sent again when the backend is back, should this edit be
    lost with the process. `undo_step`: push one when the reply is applied (not for slider moves: their
    property change is the undo step)."""
    name = obj.name
    request = payloads.EditRequest(head if head is not None else head_objects.head_spec(obj), ops,
                                   head_props(obj).resolution)
    _state.in_flight.add(name)  # before submitting: a request refused at once fails synchronously
    try:
        return backend_service.submit(request, label=f"{label} ({name})", object_name=name,
                                      on_success=partial(_apply, name, undo_step),
                                      on_failure=partial(_failed, name, set(retry_regions)))
    except backend_service.BackendUnavailable:
        _done(name)
        raise


def request_sliders(obj: bpy.types.Object, region: str) -> None:
    """A slider of `region` moved: edit now, or after the edit in flight (with Symmetric, its mirror too)."""
    if _state.applying or not head_props(obj).is_head or not head_props(obj).sliders_known:
        return  # a reply's (or the mirror's own) write, not the user's
    request_regions(obj, {region, *mirror_partner_change(obj, region)})


def request_regions(obj: bpy.types.Object, regions: set[str]) -> None:
    """Sliders of `regions` moved (by hand or by their animation): one edit now, or after the edit in
    flight; kept for later when the backend cannot take it."""
    if _state.applying or not head_props(obj).is_head or not head_props(obj).sliders_known or not regions:
        return
    name = obj.name
    if name in _state.in_flight:
        _state.dirty.setdefault(name, set()).update(regions)
        return
    regions = set(regions) | _state.pending.pop(name, set())
    for r in regions:
        _state.sent.setdefault(name, {})[r] = slider_values(obj, r)
    try:
        submit_edit(obj, [_pca_op(obj, r) for r in sorted(regions)], "Region sliders", retry_regions=regions,
                    undo_step=False)
    except backend_service.BackendUnavailable:
        _state.pending.setdefault(name, set()).update(regions)  # the panel's status box says why


def copy_sliders(source: bpy.types.Object, target: bpy.types.Object, regions: set[str]) -> None:
    """Write `source`'s slider values (e.g. a render's evaluated copy) onto `target` without edits."""
    _state.applying += 1
    try:
        for r in regions:
            head_props(target).regions[r].sliders = list(head_props(source).regions[r].sliders)
    finally:
        _state.applying -= 1


def resend_pending() -> None:
    """The backend is (re)started: send the slider moves it could not take."""
    waiting, _state.pending = _state.pending, {}
    for name, regions in sorted(waiting.items()):
        obj = bpy.data.objects.get(name)
        if obj is not None:
            request_regions(obj, regions)


def pending() -> dict[str, set[str]]:
    return {k: set(v) for k, v in _state.pending.items()}


def _done(name: str) -> None:
    _state.in_flight.discard(name)
    _state.dirty.pop(name, None)


def _failed(name: str, regions: set[str], exc) -> None:
    """Lost with the process (died or restarted: open requests end "cancelled"): slider moves are sent again
    when it is back. Refused: the sliders go back to where the mesh is."""
    dirty = _state.dirty.get(name, set())
    if getattr(exc, "code", None) in LOST_WITH_THE_PROCESS and (regions or dirty):
        _done(name)
        _state.pending.setdefault(name, set()).update(regions | dirty)
    else:
        _roll_back(name)


def slider_values(obj: bpy.types.Object, region: str) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in head_props(obj).regions[region].sliders)


def sent_sliders(name: str) -> dict[str, tuple[float, ...]]:
    """The slider values last sent for (or received with) each region of the object."""
    return _state.sent.get(name, {})


def mirror_partner_change(obj: bpy.types.Object, region: str) -> list[str]:
    """With Symmetric on, move the mirror partner's sliders by the mirrored change of `region`'s; returns
    [partner] when it moved, else []."""
    from . import identity

    props = head_props(obj)
    item = props.regions.get(region)
    if not props.symmetric or item is None or item.mirror < 0 or item.mirror == item.region_id:
        return []
    partner = next((r for r in props.regions if r.region_id == item.mirror), None)
    if partner is None:
        return []
    delta = np.array(item.sliders) - np.array(item.applied)
    try:
        moved = identity.mirrored_delta(item.region_id, partner.region_id, delta)
    except ValueError:
        return []
    _state.applying += 1
    try:
        partner.sliders = [float(np.clip(v, -SLIDER_LIMIT, SLIDER_LIMIT)) for v in np.array(partner.applied) + moved]
    finally:
        _state.applying -= 1
    return [partner.name]


def _pca_op(obj: bpy.types.Object, region: str) -> dict:
    return {"op": "pca", "region": region, "values": [float(v) for v in head_props(obj).regions[region].sliders]}


def selected_regions(obj: bpy.types.Object) -> list[str]:
    """The checked regions, else the active one."""
    regions = head_props(obj).regions
    chosen = [r.name for r in regions if r.selected]
    if not chosen and 0 <= head_props(obj).active_region < len(regions):
        chosen = [regions[head_props(obj).active_region].name]
    return chosen


def _roll_back(name: str) -> None:
    """The edit did not reach the mesh: put the sliders back where the mesh is, or, without a confirmed state
    (the file was reloaded since), mark them unknown so the panel offers to load them again."""
    _done(name)
    obj = bpy.data.objects.get(name)
    if obj is None:
        return
    confirmed = _state.confirmed.get(name)
    if confirmed is None:
        head_props(obj).sliders_known = False
        return
    _state.applying += 1
    try:
        for item in head_props(obj).regions:
            if item.name in confirmed:
                item.sliders = confirmed[item.name]
    finally:
        _state.applying -= 1


def _apply(name: str, undo_step: bool, params: dict, arrays: dict) -> None:
    _state.in_flight.discard(name)
    dirty = _state.dirty.pop(name, set())
    obj = bpy.data.objects.get(name)
    if obj is None:
        return
    head_objects.replace_head_mesh(obj, params["head"], arrays)
    store_sliders(obj, params.get("sliders"), skip=dirty)
    if undo_step:
        undo.push("imHead region edit")
    if dirty:
        request_regions(obj, dirty)


def store_sliders(obj: bpy.types.Object, sliders: dict | None, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Write the backend's slider positions ({region: [32 std units]}) without triggering edits."""
    if not sliders:
        return
    _state.applying += 1
    try:
        confirmed = _state.confirmed.setdefault(obj.name, {})
        for item in head_props(obj).regions:
            values = sliders.get(item.name)
            if values is not None:
                n = len(item.sliders)
                confirmed[item.name] = [float(v) for v in values[:n]] + [0.0] * max(0, n - len(values))
                if item.name not in skip:
                    item.sliders = confirmed[item.name]
                    _state.sent.setdefault(obj.name, {})[item.name] = slider_values(obj, item.name)
                item.applied = confirmed[item.name]
        head_props(obj).sliders_known = True
    finally:
        _state.applying -= 1
