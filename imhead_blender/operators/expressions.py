"""Expression operators: reset all weights, ARKit shape keys, bake the scene's frame range (and cancel it),
keyframe the shape keys for export."""

import bpy

from .. import backend_service, deform_jobs, expressions, live_deform, shape_keys, undo
from .common import BackendOperator, active_head


class IMHEAD_OT_reset_expressions(BackendOperator, bpy.types.Operator):
    """Set all 53 expression weights of the active head to zero (neutral)"""

    bl_idname = "imhead.reset_expressions"
    bl_label = "Neutral"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def submit_job(self, context):
        obj = active_head(context)
        with live_deform.suspended():
            for name in expressions.EXPRESSION_NAMES:
                setattr(obj.imhead.expressions, name, 0.0)
        live_deform.request_for_object(obj)
        return {"FINISHED"}


class _ChainOperator(BackendOperator):
    """A chain of deform requests (deform_jobs): refused with a RuntimeError while one already runs for the
    head, with a ValueError for a head it cannot pose."""

    REPORTED = (backend_service.BackendUnavailable, RuntimeError, ValueError)


class IMHEAD_OT_bake_expressions(_ChainOperator, bpy.types.Operator):
    """Deform the head through the model for every frame of the scene range (in chunks, with progress and
    Cancel) and store the poses as shape keys keyed per frame: playback, render and export then need no
    backend. With ARKit shape keys the bake keys hold what their mix misses (correctives)"""

    bl_idname = "imhead.bake_expressions"
    bl_label = "Bake Expressions to Shape Keys"
    bl_options = {"REGISTER"}  # the undo step is pushed when the result is applied (undo.push)

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and not deform_jobs.running(obj.name)

    def submit_job(self, context):
        obj, scene = active_head(context), context.scene
        shape_keys.start_bake(obj, scene, list(range(scene.frame_start, scene.frame_end + 1)))
        return {"FINISHED"}


class IMHEAD_OT_arkit_shape_keys(_ChainOperator, bpy.types.Operator):
    """Add the 52 ARKit shape keys (eyeBlinkLeft, jawOpen, ...; each the model's own deform at weight 1)
    driven by the expression controls: a standard face rig for playback, render and FBX/glTF export with no
    backend"""

    bl_idname = "imhead.arkit_shape_keys"
    bl_label = "Make ARKit Shape Keys"
    bl_options = {"REGISTER"}  # the undo step is pushed when the result is applied (undo.push)

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and not deform_jobs.running(obj.name)

    def submit_job(self, context):
        shape_keys.start_arkit_keys(active_head(context))
        return {"FINISHED"}


class IMHEAD_OT_cancel_bake(bpy.types.Operator):
    """Stop the active head's bake: nothing of it is applied"""

    bl_idname = "imhead.cancel_bake"
    bl_label = "Cancel Bake"

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and bool(deform_jobs.running(obj.name))

    def execute(self, context):
        deform_jobs.cancel(active_head(context).name)
        return {"FINISHED"}


class IMHEAD_OT_keyframe_shape_keys(bpy.types.Operator):
    """Keyframe the ARKit shape keys' driven values on every frame of the scene range (glTF's exporter reads
    shape-key animation only from keyframes, not from drivers)"""

    bl_idname = "imhead.keyframe_shape_keys"
    bl_label = "Keyframe Shape Keys for Export"
    bl_options = {"REGISTER"}  # undo.push, as the other imHead results

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and shape_keys.has_arkit_keys(obj)

    def execute(self, context):
        scene = context.scene
        shape_keys.keyframe_from_controls(active_head(context), scene,
                                          list(range(scene.frame_start, scene.frame_end + 1)))
        undo.push("imHead keyframe shape keys")
        return {"FINISHED"}


CLASSES = (IMHEAD_OT_reset_expressions, IMHEAD_OT_bake_expressions, IMHEAD_OT_arkit_shape_keys,
           IMHEAD_OT_cancel_bake, IMHEAD_OT_keyframe_shape_keys)
