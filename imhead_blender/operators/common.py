"""Helpers shared by the operators."""

import bpy

from .. import backend_service


def active_head(context) -> bpy.types.Object | None:
    obj = context.active_object
    if obj is not None and obj.type == "MESH" and obj.imhead.is_head:
        return obj
    return None


class BackendOperator:
    """Mixin (before bpy.types.Operator) for operators that hand work to the backend: `submit_job(context)` sends
    it and returns the operator's result. An exception of a type in REPORTED (the backend cannot take the
    request; subclasses add their own refusals) is reported once, as an error, and cancels the operator."""

    REPORTED: tuple[type[Exception], ...] = (backend_service.BackendUnavailable,)

    def submit_job(self, context: bpy.types.Context) -> set[str]:
        raise NotImplementedError

    # untyped, as Blender's own overrides: the stub's return type is a stub-only Literal of the operator results
    def execute(self, context):
        try:
            return self.submit_job(context)
        except self.REPORTED as exc:
            self.report({"ERROR"}, str(exc))  # bpy.types.Operator.report
            return {"CANCELLED"}
