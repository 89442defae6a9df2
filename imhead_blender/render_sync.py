"""Render-safe live mode: a render of a head left live (no shape keys) draws each frame's own pose.

The render evaluates every frame in its own depsgraph and calls frame_change_post with it (still renders too)
before drawing; the handler here reads the head's animated weights from that depsgraph's evaluated copy and
waits for the pose (cache, canonical, or one deform; live_deform.pose_now). Setting the vertices tags the mesh,
so Blender evaluates the frame again before it is drawn. In Blender's UI, "Render > Lock Interface" keeps the
viewport from reading the mesh while a render thread changes it.
"""

from __future__ import annotations

import sys

import bpy

from . import backend_service, live_deform, region_animation
from .properties import head_props

FRAME_TIMEOUT_S = 600.0  # one frame's deform (or region edit) on a slow CPU; past it the frame keeps its pose


@bpy.app.handlers.persistent
def on_render_init(*_args) -> None:
    live_deform.set_rendering(True)


@bpy.app.handlers.persistent
def on_render_end(scene: bpy.types.Scene, *_args) -> None:
    live_deform.set_rendering(False)
    for obj in scene.objects:  # the viewport's own frame again
        if obj.type == "MESH" and head_props(obj).is_head:
            try:
                live_deform.request_for_object(obj)
            except backend_service.BackendUnavailable:
                return


@bpy.app.handlers.persistent
def on_frame_change(scene: bpy.types.Scene, depsgraph=None) -> None:
    if depsgraph is None or depsgraph.mode != "RENDER":
        return
    for obj in scene.objects:
        if obj.type != "MESH" or not head_props(obj).is_head:
            continue
        evaluated = obj.evaluated_get(depsgraph)
        try:
            region_animation.apply_now(obj, evaluated, FRAME_TIMEOUT_S)
            if live_deform.is_baked(obj) or live_deform.mesh_build.CANONICAL not in obj.data.attributes:
                continue
            live_deform.pose_now(obj, live_deform.weights_of(evaluated), FRAME_TIMEOUT_S)
        except Exception as exc:  # a handler must not raise; the frame keeps its last pose and says so
            print(f"[imhead] frame {scene.frame_current}: could not pose '{obj.name}' for the render: {exc}",
                  file=sys.stderr)
