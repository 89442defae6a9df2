"""Generate a new head, or rebuild the active one at its (possibly changed) resolution."""

import random
from functools import partial

import bpy

from .. import backend_service, head_objects, region_edit, undo
from ..client import payloads
from .common import BackendOperator, active_head


class IMHEAD_OT_generate(BackendOperator, bpy.types.Operator):
    """Generate a new head from the seed (a random identity code) and add it to the scene"""

    bl_idname = "imhead.generate"
    bl_label = "Generate Head"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    def submit_job(self, context):
        settings = context.scene.imhead
        if settings.random_seed:
            settings.seed = random.randrange(0, 2**31 - 1)
        seed, resolution = settings.seed, settings.resolution
        on_success = partial(_add_head, context.scene.name, seed, resolution, tuple(context.scene.cursor.location))
        backend_service.submit(payloads.GenerateRequest(seed=seed, resolution=resolution),
                               label=f"Generate seed {seed} at {resolution}", on_success=on_success)
        return {"FINISHED"}


def _add_head(scene_name: str, seed: int, resolution: int, location, params: dict, arrays: dict) -> None:
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        return
    obj = head_objects.create_head_object(scene, f"imHead.{seed}", params["head"], arrays,
                                          seed=seed, resolution=resolution, location=location)
    head_objects.move_beside_others(scene, obj)
    region_edit.store_sliders(obj, params.get("sliders"))
    undo.push("imHead generate")


class IMHEAD_OT_regenerate(BackendOperator, bpy.types.Operator):
    """Rebuild the active head's mesh from its stored head at its resolution (transform and animation kept)"""

    bl_idname = "imhead.regenerate"
    bl_label = "Rebuild Mesh"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def submit_job(self, context):
        obj = active_head(context)
        request = payloads.GenerateRequest(head=head_objects.head_spec(obj), resolution=obj.imhead.resolution)
        backend_service.submit(request, label=f"Rebuild {obj.name}", object_name=obj.name,
                               on_success=partial(_replace, obj.name))
        return {"FINISHED"}


def _replace(name: str, params: dict, arrays: dict) -> None:
    obj = bpy.data.objects.get(name)
    if obj is not None:
        head_objects.replace_head_mesh(obj, params["head"], arrays)
        undo.push("imHead rebuild")


CLASSES = (IMHEAD_OT_generate, IMHEAD_OT_regenerate)
