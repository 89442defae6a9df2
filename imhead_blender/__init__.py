"""imHead: generate, animate, edit and fit implicit morphable heads from Blender's sidebar.

The neural network runs in a separate Python with torch (`python -m backend serve`); this add-on is bpy +
numpy only and talks to it through `client.py`.
"""

import bpy

from . import backend_service, identity, live_deform, operators, panels, preferences, properties, region_edit

_CLASSES = (preferences.ImHeadPreferences, *operators.CLASSES, *panels.CLASSES)


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    backend_service.cancel_all()
    live_deform.reset()
    region_edit.reset()
    identity.reset()


_HANDLERS = (
    (bpy.app.handlers.frame_change_post, live_deform.on_frame_change),
    (bpy.app.handlers.frame_change_post, identity.on_frame_change),
    (bpy.app.handlers.undo_post, live_deform.on_undo_redo),
    (bpy.app.handlers.redo_post, live_deform.on_undo_redo),
    (bpy.app.handlers.load_pre, _on_load_pre),
)


def register() -> None:
    properties.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    for handlers, fn in _HANDLERS:
        handlers.append(fn)


def unregister() -> None:
    for handlers, fn in _HANDLERS:
        if fn in handlers:
            handlers.remove(fn)
    backend_service.shutdown()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    properties.unregister()
