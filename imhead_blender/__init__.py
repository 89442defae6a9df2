"""imHead: generate, animate, edit and fit implicit morphable heads from Blender's sidebar.

The neural network runs in a separate Python with torch (`python -m backend serve`); this add-on is bpy +
numpy only and talks to it through `client.py`.
"""

import bpy

from . import (backend_service, deform_jobs, identity, live_deform, operators, panels, preferences, properties,
               region_animation, region_edit, render_sync)

_CLASSES = (preferences.ImHeadPreferences, *operators.CLASSES, *panels.CLASSES)


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    backend_service.cancel_all()
    live_deform.reset()
    region_edit.reset()
    identity.reset()
    region_animation.reset()
    deform_jobs.reset()


_HANDLERS = (
    (bpy.app.handlers.frame_change_post, live_deform.on_frame_change),
    (bpy.app.handlers.frame_change_post, identity.on_frame_change),
    (bpy.app.handlers.frame_change_post, region_animation.on_frame_change),
    (bpy.app.handlers.frame_change_post, render_sync.on_frame_change),
    (bpy.app.handlers.render_init, render_sync.on_render_init),
    (bpy.app.handlers.render_complete, render_sync.on_render_end),
    (bpy.app.handlers.render_cancel, render_sync.on_render_end),
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
    backend_service.add_ready_listener(live_deform.resend_pending)
    backend_service.add_ready_listener(region_edit.resend_pending)
    operators.register_menus()


def unregister() -> None:
    operators.unregister_menus()
    for handlers, fn in _HANDLERS:
        if fn in handlers:
            handlers.remove(fn)
    backend_service.shutdown()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    properties.unregister()
