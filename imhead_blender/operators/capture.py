"""File > Import / Export: ARKit Face Capture (.csv) in Live Link Face's layout, onto / from the active head."""

from pathlib import Path
from typing import Any, Callable

import bpy
from bpy_extras.io_utils import ExportHelper, ImportHelper

from .. import capture_apply, capture_csv, undo
from .common import active_head


# fake-bpy-module types ImportHelper.invoke and Operator.invoke differently; Blender calls it as both
class IMHEAD_OT_import_capture(bpy.types.Operator, ImportHelper):  # type: ignore[misc]
    """Keyframe a Live Link Face / ARKit face capture (.csv) on the active imHead head: the 52 blendshape
    weights on its expression controls (at the scene's fps), head and eye rotation where it has them"""

    bl_idname = "imhead.import_capture"
    bl_label = "Import ARKit Face Capture"
    bl_options = {"REGISTER"}  # undo.push: the step exists however the operator is called (scripts too)

    filename_ext = ".csv"
    filter_glob: bpy.props.StringProperty(default="*.csv", options={"HIDDEN"})
    start_frame: bpy.props.IntProperty(name="Start Frame", default=-1,
                                       description="Frame of the capture's first row (-1: the scene's start)")
    timecode_rate: bpy.props.FloatProperty(
        name="Timecode Rate", default=0.0, min=0.0, max=1000.0,
        description="Timecode frames per second (0: detect from the frame numbers; the scene's fps for a "
        "capture shorter than a second)")
    set_frame_range: bpy.props.BoolProperty(name="Extend Frame Range", default=True,
                                            description="Grow the scene's frame range to cover the capture")

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        obj, scene = active_head(context), context.scene
        path = Path(self.filepath)
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.report({"ERROR"}, f"cannot read {path}: {exc.strerror or exc}")
            return {"CANCELLED"}
        try:  # everything is checked before the scene is touched
            capture = capture_csv.parse(data, rate=self.timecode_rate, short_rate=capture_apply.scene_fps(scene))
        except capture_csv.CaptureError as exc:
            self.report({"ERROR"}, f"{path.name}: {exc}")
            return {"CANCELLED"}
        start = scene.frame_start if self.start_frame < 0 else self.start_frame
        done = capture_apply.apply_capture(obj, scene, capture, start, self.set_frame_range)
        undo.push("imHead import capture")
        extra = [f"head rotation on the {done['head']}" if done["head"] else "no head rotation",
                 f"{done['eyes']} eye(s)" if done["eyes"] else "no eyes keyed",
                 "tongueOut keyed" if done["tongue"] else "tongueOut skipped (no ARKit shape keys)"]
        self.report({"INFO"}, f"{path.name}: {len(capture.seconds)} rows at {capture.rate:g} fps timecode -> "
                              f"{done['frames']} frames from {start}; " + ", ".join(extra))
        return {"FINISHED"}


class IMHEAD_OT_export_capture(bpy.types.Operator, ExportHelper):  # type: ignore[misc]  # as above
    """Write the active head's expression animation over the scene's frame range as a Live Link Face CSV"""

    bl_idname = "imhead.export_capture"
    bl_label = "Export ARKit Face Capture"
    bl_options = {"REGISTER"}

    filename_ext = ".csv"
    filter_glob: bpy.props.StringProperty(default="*.csv", options={"HIDDEN"})

    @classmethod
    def poll(cls, context):
        return active_head(context) is not None

    def execute(self, context):
        obj, scene = active_head(context), context.scene
        frames = list(range(scene.frame_start, scene.frame_end + 1))
        text = capture_apply.export_capture(obj, scene, frames)
        try:
            Path(self.filepath).write_text(text, encoding="utf-8", newline="")
        except OSError as exc:
            self.report({"ERROR"}, f"cannot write {self.filepath}: {exc.strerror or exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"wrote {len(frames)} frames to {self.filepath}")
        return {"FINISHED"}


def menu_import(self, context):
    self.layout.operator(IMHEAD_OT_import_capture.bl_idname, text="ARKit Face Capture (.csv)")


def menu_export(self, context):
    self.layout.operator(IMHEAD_OT_export_capture.bl_idname, text="ARKit Face Capture (.csv)")


# (Blender calls a menu's draw functions with (menu, context); the stubs expect one argument)
MENUS: tuple[tuple[Any, Callable[..., None]], ...] = (
   (bpy.types.TOPBAR_MT_file_import, menu_import), (bpy.types.TOPBAR_MT_file_export, menu_export))
CLASSES = (IMHEAD_OT_import_capture, IMHEAD_OT_export_capture)
