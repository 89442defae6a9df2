"""Region editing operators: randomise / reset / swap / blend the selected regions, load slider positions,
select regions. Each submits one backend `edit`; the reply replaces the mesh and keeps the transform."""

import random

import bpy

from .. import head_objects, region_animation, region_edit
from ..properties import head_props
from .common import BackendOperator, active_head

ACTIONS = [
    ("RANDOMISE", "Randomise", "New random codes for the selected regions"),
    ("RESET", "Reset", "Back to the codes the head's identity gives the selected regions"),
    ("SWAP", "Swap From Other", "Take the other head's codes for the selected regions"),
    ("BLEND", "Blend With Other", "Move the selected regions toward the other head's by Amount"),
    ("LOAD_SLIDERS", "Edit Sliders", "Fetch this head's slider positions from the backend"),
]


class IMHEAD_OT_region_edit(BackendOperator, bpy.types.Operator):
    """Edit region codes of the active head"""

    bl_idname = "imhead.region_edit"
    bl_label = "Edit Regions"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    action: bpy.props.EnumProperty(items=ACTIONS, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and not region_edit.busy(obj.name)

    @classmethod
    def description(cls, context, properties):
        return next(d for key, _n, d in ACTIONS if key == properties.action)

    def submit_job(self, context):
        obj = active_head(context)
        props = obj.imhead
        regions = region_edit.selected_regions(obj)
        if not regions:
            self.report({"ERROR"}, "No regions: the backend has not sent its region list yet")
            return {"CANCELLED"}
        if self.action == "RANDOMISE":
            ops = [{"op": "randomise", "regions": regions, "seed": random.randrange(2**31 - 1),
                    "scale": props.randomise_scale}]
        elif self.action == "RESET":
            ops = [{"op": "reset", "regions": regions}]
        elif self.action in ("SWAP", "BLEND"):
            other = props.swap_source
            if other is None or not other.imhead.is_head:
                self.report({"ERROR"}, "Pick the other imHead head first")
                return {"CANCELLED"}
            op = {"op": self.action.lower(), "regions": regions, "other": head_objects.head_spec(other)}
            if self.action == "BLEND":
                op["t"] = props.blend_amount
            ops = [op]
        else:
            ops = [_noop(obj)]
        base = head_objects.head_spec(obj)
        region_edit.submit_edit(obj, ops, self.action.replace("_", " ").title())
        if self.action == "BLEND":  # a keyframed Amount re-blends from this base on frame change
            region_animation.record_blend(obj, base, regions, ops[0]["other"], props.blend_amount)
        elif self.action != "LOAD_SLIDERS":
            region_animation.clear_blend(obj)
        return {"FINISHED"}


def _noop(obj: bpy.types.Object) -> dict:
    """An edit that changes nothing (the reply still carries every region's slider positions)."""
    spec = head_objects.head_spec(obj)
    overrides = spec.get("region_overrides", {})
    plain = [r.name for r in head_props(obj).regions if r.name not in overrides]
    if plain:
        return {"op": "reset", "regions": plain}
    name = next(iter(overrides))
    return {"op": "set", "codes": {name: overrides[name]}}


class IMHEAD_OT_region_select(bpy.types.Operator):
    """Select regions of the active head for the region edits"""

    bl_idname = "imhead.region_select"
    bl_label = "Select Regions"
    bl_options = {"REGISTER", "UNDO"}

    action: bpy.props.EnumProperty(items=[("ALL", "All", ""), ("NONE", "None", ""), ("INVERT", "Invert", ""),
                                          ("MIRROR", "Mirror", "Also select the mirror partners")],
                                   options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        regions = active_head(context).imhead.regions
        partners = {r.mirror for r in regions if r.selected} if self.action == "MIRROR" else set()
        for r in regions:
            if self.action == "ALL":
                r.selected = True
            elif self.action == "NONE":
                r.selected = False
            elif self.action == "INVERT":
                r.selected = not r.selected
            elif r.region_id in partners:
                r.selected = True
        return {"FINISHED"}


CLASSES = (IMHEAD_OT_region_edit, IMHEAD_OT_region_select)
