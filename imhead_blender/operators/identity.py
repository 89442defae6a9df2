"""Identity operators: a random identity with a strength; turn a head into an ordinary mesh."""

import random

import bpy
import numpy as np

from .. import backend_service, head_objects, identity, live_deform
from .common import BackendOperator, active_head


class IMHEAD_OT_randomise_identity(BackendOperator, bpy.types.Operator):
    """Give the active head a new random identity, Strength standard deviations from the average head
    (region edits are dropped; expressions, transform and materials stay)"""

    bl_idname = "imhead.randomise_identity"
    bl_label = "Randomise Identity"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    @classmethod
    def poll(cls, context):
        obj = active_head(context)
        return obj is not None and not identity.busy(obj.name)

    REPORTED = (ValueError, backend_service.BackendUnavailable)

    def submit_job(self, context):
        obj = active_head(context)
        spec = head_objects.head_spec(obj)
        rng = np.random.default_rng(random.randrange(2**63))
        spec["identity"] = identity.random_identity(obj.imhead.randomise_strength, rng).tolist()
        spec["region_overrides"] = {}
        identity.submit(obj, spec, "Randomise identity")
        return {"FINISHED"}


class IMHEAD_OT_apply_as_mesh(bpy.types.Operator):
    """Make the active head an ordinary mesh: geometry, shape keys, materials and parts stay, the backend is
    never asked about it again (no live expressions, rebuilds or edits)"""

    bl_idname = "imhead.apply_as_mesh"
    bl_label = "Apply as Mesh"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        obj = active_head(context)
        for job in backend_service.jobs(obj.name):
            backend_service.cancel(job.request_id)
            job.on_success = job.on_failure = None
        obj.imhead.is_head = False
        live_deform.forget(obj.name)
        self.report({"INFO"}, f"'{obj.name}' is now an ordinary mesh")
        return {"FINISHED"}


CLASSES = (IMHEAD_OT_randomise_identity, IMHEAD_OT_apply_as_mesh)
