"""Backend lifecycle operators: restart, cancel a job."""

import bpy

from .. import backend_service
from .common import BackendOperator


class IMHEAD_OT_restart_backend(BackendOperator, bpy.types.Operator):
    """Stop the backend process (cancelling its jobs) and start a new one"""

    bl_idname = "imhead.restart_backend"
    bl_label = "Restart Backend"

    def submit_job(self, context):
        backend_service.restart()
        return {"FINISHED"}


class IMHEAD_OT_cancel_job(bpy.types.Operator):
    """Ask the backend to stop this request"""

    bl_idname = "imhead.cancel_job"
    bl_label = "Cancel"

    request_id: bpy.props.IntProperty(options={"HIDDEN", "SKIP_SAVE"})

    def execute(self, context):
        if not backend_service.cancel(self.request_id):
            self.report({"WARNING"}, "That request has already finished")
            return {"CANCELLED"}
        return {"FINISHED"}


CLASSES = (IMHEAD_OT_restart_backend, IMHEAD_OT_cancel_job)
