"""Keyframed region sliders and blend amounts: applied on frame change, like expressions.

Animation changes properties without their update callbacks, so on every frame change each head's slider
values are compared with those last sent (region_edit.sent_sliders) and the regions that moved go out as one
`edit`. A Blend remembers its base head, regions and other head on the object (`blend_json`); a changed
`blend_amount` re-blends from that base (not from the last result, so the amount means the same on every
frame). During a render `apply_now` does the same from the render's evaluated copy and waits for the mesh.
"""

from __future__ import annotations

import json

import bpy

from . import backend_service, region_edit
from .properties import head_props

_blend_sent: dict[str, float] = {}


def reset() -> None:
    _blend_sent.clear()


def record_blend(obj: bpy.types.Object, base: dict, regions: list[str], other: dict, amount: float) -> None:
    """A Blend was submitted: later amounts re-blend `base`'s `regions` toward `other`."""
    head_props(obj).blend_json = json.dumps({"base": base, "regions": regions, "other": other}, separators=(",", ":"))
    _blend_sent[obj.name] = round(float(amount), 6)


def clear_blend(obj: bpy.types.Object) -> None:
    head_props(obj).blend_json = ""
    _blend_sent.pop(obj.name, None)


def changed_regions(obj: bpy.types.Object, values_from: bpy.types.Object) -> set[str]:
    """Regions whose sliders on `values_from` (the object or its evaluated copy) differ from those sent."""
    sent = region_edit.sent_sliders(obj.name)
    if not head_props(obj).sliders_known or not sent:
        return set()
    return {r.name for r in head_props(values_from).regions
            if r.name in sent and region_edit.slider_values(values_from, r.name) != sent[r.name]}


def _blend_op(obj: bpy.types.Object, amount: float) -> tuple[dict, dict] | None:
    """(base head, blend op) when the blend amount moved since it was last sent."""
    if not head_props(obj).blend_json:
        return None
    amount = round(float(amount), 6)
    if _blend_sent.get(obj.name) == amount:
        return None
    record = json.loads(head_props(obj).blend_json)
    return record["base"], {"op": "blend", "regions": record["regions"], "other": record["other"], "t": amount}


def _submit_blend(obj: bpy.types.Object, amount: float) -> backend_service.Job | None:
    blend = _blend_op(obj, amount)
    if blend is None or region_edit.busy(obj.name):
        return None
    job = region_edit.submit_edit(obj, [blend[1]], "Blend amount", head=blend[0], undo_step=False)
    _blend_sent[obj.name] = blend[1]["t"]
    return job


@bpy.app.handlers.persistent
def on_frame_change(scene: bpy.types.Scene, depsgraph=None) -> None:
    """frame_change_post (viewport): submit only, never wait."""
    if depsgraph is not None and depsgraph.mode == "RENDER":
        return
    for obj in scene.objects:
        if obj.type != "MESH" or not head_props(obj).is_head:
            continue
        try:
            if _submit_blend(obj, head_props(obj).blend_amount) is None:
                region_edit.request_regions(obj, changed_regions(obj, obj))
        except backend_service.BackendUnavailable:
            return  # the panel shows why; the moved sliders stay pending in region_edit


def apply_now(obj: bpy.types.Object, evaluated: bpy.types.Object, timeout: float) -> None:
    """For a render frame: the evaluated copy's sliders / blend amount on the mesh before returning."""
    regions = changed_regions(obj, evaluated)
    amount = head_props(evaluated).blend_amount
    if not regions and _blend_op(obj, amount) is None:
        return
    backend_service.drain(timeout, until=lambda: not region_edit.busy(obj.name))
    job = _submit_blend(obj, amount)
    if job is None:
        region_edit.copy_sliders(evaluated, obj, regions)
        region_edit.request_regions(obj, regions)
    backend_service.drain(timeout, until=lambda: not region_edit.busy(obj.name))
