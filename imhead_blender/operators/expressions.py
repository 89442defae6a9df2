"""Expression operators: reset all weights, bake the scene's frame range to shape keys."""

import bpy

from .. import backend_service, expressions, live_deform
from .common import active_head


class IMHEAD_OT_reset_expressions(bpy.types.Operator):
    """Set all 53 expression weights of the active head to zero (neutral)"""

    bl_idname = "imhead.reset_expressions"
    bl_label = "Neutral"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        obj = active_head(context)
        with live_deform.suspended():
            for name in expressions.EXPRESSION_NAMES:
                setattr(obj.imhead.expressions, name, 0.0)
        try:
            live_deform.request_for_object(obj)
        except backend_service.BackendUnavailable as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class IMHEAD_OT_bake_expressions(bpy.types.Operator):
    """Deform the head for every frame of the scene range in one batched request and store the result as
    shape keys keyed per frame (playback then needs no backend)"""

    bl_idname = "imhead.bake_expressions"
    bl_label = "Bake Expressions to Shape Keys"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        obj, scene = active_head(context), context.scene
        frames = list(range(scene.frame_start, scene.frame_end + 1))
        weights = live_deform.frame_weights(scene, obj, frames)
        try:
            live_deform.submit_bake(obj, frames, weights)
        except backend_service.BackendUnavailable as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


CLASSES = (IMHEAD_OT_reset_expressions, IMHEAD_OT_bake_expressions)
