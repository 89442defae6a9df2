"""Add-on preferences: which Python (with torch) runs the backend."""

import json
import os
from pathlib import Path

import bpy

PACKAGE_DIR = Path(__file__).resolve().parent
DEVICE_ENV = "IMHEAD_DEVICE"  # read by `python -m backend serve` as its --device default
DEVICES = {"AUTO": "auto", "CPU": "cpu", "GPU": "cuda"}


def _device_changed(self, context):
    from . import backend_service

    backend_service.restart_if_running()


class ImHeadPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    python_path: bpy.props.StringProperty(
        name="Python",
        description="Python interpreter with torch installed that runs the imHead backend. "
        "Empty: $IMHEAD_PYTHON, then the .venv recorded when the extension was built",
        subtype="FILE_PATH",
        options=set(),
    )
    start_with_panel: bpy.props.BoolProperty(
        name="Start with the panel",
        description="Start the backend when the imHead tab is first shown, so the first head comes sooner "
        "(the backend then holds its memory while Blender runs). Off: it starts on the first request",
        default=True,
        options=set(),
    )

    device: bpy.props.EnumProperty(
        name="Device",
        items=[("AUTO", "Automatic", "A CUDA GPU when the backend's torch sees one, else the CPU"),
               ("CPU", "CPU", "Always the CPU"),
               ("GPU", "GPU", "A CUDA GPU; the backend reports an error when there is none")],
        default="AUTO", options=set(), update=_device_changed,
        description="Where the backend runs the model (its --device); changing it restarts a running backend")

    def draw(self, context):
        from . import backend_service

        layout = self.layout
        layout.prop(self, "python_path")
        row = layout.row()
        row.prop(self, "device")
        hs = backend_service.handshake()
        row.label(text=f"In use: {hs.torch_device}" if hs is not None else "In use: (backend not running)")
        layout.prop(self, "start_with_panel")
        try:
            python, source = resolve_python(self.python_path)
            layout.label(text=f"Using {python} ({source})", icon="CHECKMARK")
        except RuntimeError as exc:
            layout.label(text=str(exc), icon="ERROR")
        layout.operator("imhead.restart_backend", icon="FILE_REFRESH")


def get_preferences(context=None) -> ImHeadPreferences:
    context = context or bpy.context
    return context.preferences.addons[__package__].preferences


def backend_env(prefs: "ImHeadPreferences") -> dict[str, str]:
    """Environment for the backend process: the device choice."""
    return {DEVICE_ENV: DEVICES.get(prefs.device, "auto")}


def build_info() -> dict:
    """What build.py recorded at build time (absent when running from a source checkout)."""
    path = PACKAGE_DIR / "build_info.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def resolve_python(preference: str) -> tuple[str, str]:
    """Preference -> $IMHEAD_PYTHON -> build-time .venv; returns (path, where it came from)."""
    candidates = [
        (bpy.path.abspath(preference) if preference else "", "preference"),
        (os.environ.get("IMHEAD_PYTHON", ""), "IMHEAD_PYTHON"),
        (str(build_info().get("python") or ""), "build .venv"),
    ]
    for path, source in candidates:
        if path:
            if not os.path.isfile(path):
                raise RuntimeError(f"Python from {source} does not exist: {path}")
            return path, source
    raise RuntimeError("No Python with torch configured: set it in Preferences > Add-ons > imHead")


def backend_root() -> Path:
    """Folder holding backend/ and weights/: inside the installed extension, or the source checkout."""
    for root in (PACKAGE_DIR, PACKAGE_DIR.parent):
        if (root / "backend" / "__init__.py").is_file():
            return root
    raise RuntimeError(f"backend/ not found next to the add-on ({PACKAGE_DIR})")
