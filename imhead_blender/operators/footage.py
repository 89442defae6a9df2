"""Head from Photo / Video: the backend fits a head, its per-frame expressions and head pose to footage the
user picks (docs/capture.md); the reply becomes a new head with its expressions and rotation keyframed and a
camera that shows the footage behind it. Nothing in the scene changes until the fit succeeds."""

import os
from functools import partial

import bpy
import numpy as np
from mathutils import Matrix

from .. import backend_service, expressions, footage_pose, head_objects, live_deform
from ..client import payloads
from .common import BackendOperator

KEY_THRESHOLD = 0.01  # expression channels that never reach this are left unkeyed (at 0)


class IMHEAD_OT_head_from_footage(BackendOperator, bpy.types.Operator):
    """Fit a head to a photo or a short video of one face: identity, expressions and head turn per frame
    (keyframed), with the footage as the camera's background"""

    bl_idname = "imhead.head_from_footage"
    bl_label = "Head from Photo / Video"
    bl_options = {"REGISTER"}  # no undo step: the result arrives later, from pump_backend()

    filepath: bpy.props.StringProperty(name="File", subtype="FILE_PATH",
                                       description="A photo or a short video showing one face")
    filter_glob: bpy.props.StringProperty(
        default="*.png;*.jpg;*.jpeg;*.bmp;*.tif;*.tiff;*.webp;*.mp4;*.mov;*.avi;*.mkv;*.webm;*.m4v;*.mpg;*.mpeg",
        options={"HIDDEN"})
    steps: bpy.props.IntProperty(name="Steps", min=0, max=5000, default=0,
                                 description="Optimisation steps (0: the backend's default)")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def submit_job(self, context):
        path = bpy.path.abspath(self.filepath)
        if not path or not os.path.isfile(path):
            self.report({"ERROR"}, f"no such file: {path or '(none chosen)'}")
            return {"CANCELLED"}
        scene = context.scene
        request = payloads.FitCaptureRequest(path, resolution=scene.imhead.resolution, steps=self.steps or None)
        name = os.path.splitext(os.path.basename(path))[0]
        backend_service.submit(request, label=f"Head from {os.path.basename(path)}",
                               on_success=partial(apply_fit, scene.name, path, name, scene.imhead.resolution))
        return {"FINISHED"}


def apply_fit(scene_name: str, path: str, name: str, resolution: int, params: dict, arrays: dict) -> None:
    """The reply: head object, keyframes, camera with the footage behind it."""
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        return
    cap = params["capture"]
    exp = np.asarray(arrays["expressions"], np.float32)
    heads = footage_pose.head_matrices(arrays["rotations"], arrays["translations"])
    obj = head_objects.create_head_object(scene, f"{name}.imHead", params["head"], arrays, seed=0,
                                          resolution=resolution)
    obj.rotation_mode = "XYZ"
    video = len(exp) > 1
    start = scene.frame_start
    with live_deform.suspended():
        euler = None
        for t in range(len(exp)):
            m = Matrix(heads[t].tolist())
            euler = m.to_euler("XYZ", euler) if euler is not None else m.to_euler("XYZ")
            obj.location, obj.rotation_euler = m.translation, euler
            if video:
                obj.keyframe_insert("location", frame=start + t)
                obj.keyframe_insert("rotation_euler", frame=start + t)
        for j, ename in enumerate(expressions.EXPRESSION_NAMES):
            if not video:
                setattr(obj.imhead.expressions, ename, float(exp[0, j]))
                continue
            if exp[:, j].max() < KEY_THRESHOLD:
                continue
            for t in range(len(exp)):
                setattr(obj.imhead.expressions, ename, float(exp[t, j]))
                obj.keyframe_insert(f"imhead.expressions.{ename}", frame=start + t)
    if video:
        scene.frame_end = max(scene.frame_end, start + len(exp) - 1)
        if cap.get("fps"):
            scene.render.fps, scene.render.fps_base = round(cap["fps"]), 1.0
    _camera(scene, name, path, cap, arrays["translations"], video)
    live_deform.request_for_object(obj)


def _camera(scene, name: str, path: str, cap: dict, translations: np.ndarray, video: bool) -> None:
    cam = bpy.data.cameras.new(f"{name}.camera")
    cam.sensor_fit, cam.sensor_width = "HORIZONTAL", footage_pose.SENSOR_WIDTH_MM
    cam.lens = footage_pose.lens_mm(cap["focal_px"], cap["width"])
    cam.clip_start = 0.01
    cam.show_background_images = True
    bg = cam.background_images.new()
    bg.alpha, bg.display_depth, bg.frame_method = 1.0, "BACK", "FIT"
    if video:
        clip = bpy.data.movieclips.load(path, check_existing=True)
        clip.frame_start = scene.frame_start
        bg.source, bg.clip = "MOVIE_CLIP", clip
    else:
        bg.source, bg.image = "IMAGE", bpy.data.images.load(path, check_existing=True)
    cam_obj = bpy.data.objects.new(f"{name}.camera", cam)
    cam_obj.matrix_world = Matrix(footage_pose.camera_matrix(translations).tolist())
    scene.collection.objects.link(cam_obj)
    scene.camera = cam_obj
    scene.render.resolution_x, scene.render.resolution_y = int(cap["width"]), int(cap["height"])
    scene.render.resolution_percentage = 100


CLASSES = (IMHEAD_OT_head_from_footage,)
