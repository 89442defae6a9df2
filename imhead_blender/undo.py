"""Undo steps for results that arrive after their operator returned (generate, region edit, fit, bake, ARKit
keys): the step is pushed when the reply is applied, so Ctrl+Z goes back to the mesh and parameters before it.
"""

import sys

import bpy


def push(message: str) -> None:
    """One global undo step holding the current state. Never raises: a missing undo step must not lose the
    result that was just applied (the reason goes to the console)."""
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError as exc:
        print(f"[imhead] no undo step for {message!r}: {exc}", file=sys.stderr)
