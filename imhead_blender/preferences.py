"""Add-on preferences: which Python (with torch) runs the backend."""

import json
import os
from pathlib import Path

import bpy

PACKAGE_DIR = Path(__file__).resolve().parent


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

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "python_path")
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
