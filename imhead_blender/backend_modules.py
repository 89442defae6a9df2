"""The backend's own numpy-only modules the add-on speaks through: the codec (wire.py), the ops' typed params
(payloads.py, replies.py) and their errors (errors.py). bpy-free, numpy only, never torch."""

from pathlib import Path

if (Path(__file__).resolve().parent / "backend" / "wire.py").is_file():
    # inside the built extension, backend/ is part of the add-on package (build.py copies it in; not in the tree)
    from .backend import errors, payloads, replies, wire  # type: ignore[import-not-found]
else:
    from backend import errors, payloads, replies, wire  # source checkout: backend/ sits beside imhead_blender/

__all__ = ["errors", "payloads", "replies", "wire"]
