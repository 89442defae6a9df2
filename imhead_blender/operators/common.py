"""Helpers shared by the operators."""

import bpy


def active_head(context) -> bpy.types.Object | None:
    obj = context.active_object
    if obj is not None and obj.type == "MESH" and obj.imhead.is_head:
        return obj
    return None
