"""imHead: generate, animate, edit and fit implicit morphable heads from Blender's sidebar.

The neural network runs in a separate Python with torch (`python -m backend serve`); this add-on is bpy +
numpy only and talks to it through `client.py`.
"""

import bpy

from . import backend_service, live_deform, operators, panels, preferences, properties, region_edit

_CLASSES = (preferences.ImHeadPreferences, *operators.CLASSES, *panels.CLASSES)


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    backend_service.cancel_all()
    live_deform.reset()
    region_edit.reset()


def register() -> None:
    properties.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    bpy.app.handlers.frame_change_post.append(live_deform.on_frame_change)
    bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    if live_deform.on_frame_change in bpy.app.handlers.frame_change_post:
        bpy.app.handlers.frame_change_post.remove(live_deform.on_frame_change)
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    backend_service.shutdown()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    properties.unregister()
