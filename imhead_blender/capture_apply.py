"""A parsed face capture onto a head as keyframes, and a head's expression animation back out as a capture.

Import (after capture_csv.parse succeeded, so a bad file never gets here and changes nothing):
- the 52 ARKit weights, retimed to the scene's fps, become keyframes of the head's 53 expression controls
  (arkit.ict_from_arkit: browInnerUp and cheekPuff on both sides); tongueOut keys the "tongueOut" shape key
  where the head has the ARKit keys (the model has no tongue expression);
- HeadYaw / HeadPitch / HeadRoll (radians) key a neck bone's rotation when the head's parent armature has a bone
  named "neck" (else "head"), otherwise the head object's rotation: yaw about the up axis (Blender Z), pitch
  about X (positive tips the face down), roll about the face axis (Y), added to the rotation it had;
- eye yaw / pitch key the rotation of the head's eye objects (children named "...eye..." with a left / right
  marker: "Left", ".L", "_L"); heads without eyes skip them (the report says so).
Keys are linear, one per scene frame, replacing the controls' keys in the imported range.
"""

from __future__ import annotations

import re
from typing import Any

import bpy
import numpy as np

from . import arkit, capture_csv, expressions, live_deform

_LINEAR = 1  # FCurve keyframe interpolation enum index: CONSTANT 0, LINEAR 1, BEZIER 2
_LEFT = re.compile(r"(left|[._ ]l$|[._ ]l[._ ])", re.IGNORECASE)
_RIGHT = re.compile(r"(right|[._ ]r$|[._ ]r[._ ])", re.IGNORECASE)


def scene_fps(scene: bpy.types.Scene) -> float:
    return scene.render.fps / scene.render.fps_base


def _fcurve(id_data: bpy.types.Object | bpy.types.Key, path: str, index: int = 0):
    anim = id_data.animation_data or id_data.animation_data_create()
    if anim.action is None:
        anim.action = bpy.data.actions.new(f"{id_data.name}Action")
    return anim.action.fcurve_ensure_for_datablock(id_data, path, index=index)


def key_curve(id_data: bpy.types.Object | bpy.types.Key, path: str, frames: np.ndarray, values: np.ndarray,
              index: int = 0) -> None:
    """Linear keys (frames, values) on one channel, replacing its keys within the frames' range."""
    curve = _fcurve(id_data, path, index)
    lo, hi = float(frames[0]) - 0.5, float(frames[-1]) + 0.5
    points = curve.keyframe_points
    for i in range(len(points) - 1, -1, -1):
        if lo <= points[i].co[0] <= hi:
            points.remove(points[i], fast=True)
    start = len(points)
    points.add(len(frames))
    co = np.empty(2 * len(points), dtype=np.float32)
    points.foreach_get("co", co)
    co[2 * start :: 2] = frames
    co[2 * start + 1 :: 2] = values
    points.foreach_set("co", co)
    interp = np.empty(len(points), dtype=np.int32)
    points.foreach_get("interpolation", interp)
    interp[start:] = _LINEAR
    points.foreach_set("interpolation", interp)
    curve.update()  # sorts the keys and sets their handles


def _neck_bone(obj: bpy.types.Object):
    rig = obj.parent if obj.parent is not None and obj.parent.type == "ARMATURE" else None
    if rig is None:
        return None, None
    bones = {b.name.lower(): b for b in rig.pose.bones}
    bone = bones.get("neck") or bones.get("head")
    return (rig, bone) if bone is not None else (None, None)


def eye_objects(obj: bpy.types.Object) -> dict[str, bpy.types.Object]:
    """{'left': obj, 'right': obj} among the head's children named like eyes."""
    found: dict[str, bpy.types.Object] = {}
    for child in obj.children:
        name = child.name
        if "eye" not in name.lower() or "lash" in name.lower() or "brow" in name.lower():
            continue
        if _LEFT.search(name):
            found.setdefault("left", child)
        elif _RIGHT.search(name):
            found.setdefault("right", child)
    return found


def apply_capture(obj: bpy.types.Object, scene: bpy.types.Scene, capture: capture_csv.Capture, start: int,
                  set_range: bool = True) -> dict:
    """Key `capture` on the head from frame `start`; returns what was keyed (for the operator's report)."""
    offsets, data = capture_csv.resample(capture, scene_fps(scene))
    frames = (start + offsets).astype(np.float32)
    weights = data["weights"]
    assert weights is not None  # resample() always has the weights; only head and eyes are optional
    ict = arkit.ict_from_arkit(weights)
    with live_deform.suspended():
        for j, name in enumerate(expressions.EXPRESSION_NAMES):
            key_curve(obj, f"imhead.expressions.{name}", frames, ict[:, j])
    report: dict[str, Any] = {"frames": len(frames), "tongue": False, "head": "", "eyes": 0}
    keys = obj.data.shape_keys
    if keys is not None and "tongueOut" in keys.key_blocks:
        key_curve(keys, 'key_blocks["tongueOut"].value', frames,
                  weights[:, arkit.ARKIT_NAMES.index("tongueOut")])
        report["tongue"] = True
    if data["head"] is not None:
        yaw, pitch, roll = data["head"].T
        rig, bone = _neck_bone(obj)
        if bone is not None:
            bone.rotation_mode = "XYZ"
            base, target, path = bone.rotation_euler, rig, f'pose.bones["{bone.name}"].rotation_euler'
            # a bone's Y runs along it (up the neck): yaw about Y, pitch about X, roll about Z
            channels = (pitch, yaw, roll)
            report["head"] = f"bone {bone.name}"
        else:
            base, target, path = obj.rotation_euler, obj, "rotation_euler"
            channels = (pitch, roll, yaw)
            report["head"] = "object"
        base = tuple(base[:])
        for axis in range(3):
            key_curve(target, path, frames, base[axis] + channels[axis], index=axis)
    eyes = eye_objects(obj)
    if data["eyes"] is not None and eyes:
        for side, columns in (("left", (0, 1)), ("right", (3, 4))):
            eye = eyes.get(side)
            if eye is None:
                continue
            base = tuple(eye.rotation_euler[:])
            yaw, pitch = data["eyes"][:, columns[0]], data["eyes"][:, columns[1]]
            key_curve(eye, "rotation_euler", frames, base[0] + pitch, index=0)
            key_curve(eye, "rotation_euler", frames, base[2] + yaw, index=2)
            report["eyes"] += 1
    if set_range:
        scene.frame_start = min(scene.frame_start, start)
        scene.frame_end = max(scene.frame_end, int(frames[-1]))
    scene.frame_set(scene.frame_current)  # show the imported pose at the current frame
    return report


def export_capture(obj: bpy.types.Object, scene: bpy.types.Scene, frames: list[int]) -> str:
    """The head's expression animation over `frames` as Live Link Face CSV text (head rotation from the head
    object's rotation, the inverse of the import's mapping; eyes zero)."""
    from . import shape_keys

    current = scene.frame_current
    ict = np.empty((len(frames), len(expressions.EXPRESSION_NAMES)), dtype=np.float32)
    head = np.empty((len(frames), 3))
    with live_deform.suspended():
        try:
            for i, frame in enumerate(frames):
                scene.frame_set(frame)
                ict[i] = live_deform.weights_of(obj)
                rx, ry, rz = obj.rotation_euler[:]
                head[i] = (rz, rx, ry)  # yaw, pitch, roll
        finally:
            scene.frame_set(current)
    weights = (shape_keys.arkit_weights_at(obj, ict, frames) if shape_keys.has_arkit_keys(obj)
               else arkit.arkit_from_ict(ict))
    return capture_csv.write(weights, scene_fps(scene), head)
