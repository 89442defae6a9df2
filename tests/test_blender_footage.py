"""Head from Photo / Video in real Blender (bpy 5.0.1) against the real backend: a photo (the astronaut) and a
short video become a head with its expressions and rotation (keyframed for the video) and a camera with the
footage behind it; a fit shows progress and cancels; a picture without a face is a clear error and changes
nothing in the scene. Each scenario runs in its own Blender process (tests/test_blender_addon.py's harness)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from test_blender_addon import _heads, _install  # the add-on test's install and head helpers

HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def footage(built_zip, venv_python, tmp_path_factory) -> dict:
    return run_scenario_here("footage", built_zip, venv_python, tmp_path_factory.mktemp("footage"))


def run_scenario_here(name: str, zip_path: Path, python: str, tmp_path: Path) -> dict:
    import os
    import subprocess

    user = tmp_path / "blender_user"
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user))
    for kind in ("CONFIG", "SCRIPTS", "EXTENSIONS", "DATAFILES"):
        (user / kind.lower()).mkdir(parents=True, exist_ok=True)
        env[f"BLENDER_USER_{kind}"] = str(user / kind.lower())
    facts = tmp_path / f"{name}.json"
    proc = subprocess.run([python, str(HERE), name, str(zip_path), str(facts), str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"scenario {name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(facts.read_text())


def test_no_face_is_an_error_and_nothing_changes(footage):
    assert "no face found" in footage["no_face_error"]
    assert footage["objects_after_error"] == footage["objects_before"]
    assert footage["cameras_after_error"] == footage["cameras_before"]


def test_fit_shows_progress_and_cancels(footage):
    assert footage["progress_seen"][0] > 0.0 and footage["progress_seen"][1]
    assert footage["cancel_code"] == "cancelled"
    assert footage["objects_after_cancel"] == footage["objects_before"]


def test_photo_gives_a_head_and_a_camera_with_the_photo_behind(footage):
    p = footage["photo"]
    assert p["heads"] == 1 and p["vertices"] > 1000
    assert p["camera_background"] == ["IMAGE", "astronaut.png"]
    assert p["scene_camera"] and p["resolution"] == [512, 512]
    assert 5.0 < p["lens_mm"] < 500.0
    assert p["animated"] is False  # one photo: values, no keyframes
    assert 0.0 <= p["max_expression"] <= 1.0
    # the head stands in front of the camera: its origin is ahead along the camera's view (+Y here)
    assert p["head_in_front"] > 0.2


def test_video_keyframes_expressions_and_rotation(footage):
    v = footage["video"]
    assert v["heads"] == 1 and v["animated"] is True
    assert v["camera_background"][0] == "MOVIE_CLIP"
    assert v["rotation_changes"] > 0.0  # the turned frames differ in rotation
    assert v["frame_end"] >= v["frames"]


# ===================================================================== scenario (run inside Blender)

def _make_footage(folder: Path) -> tuple[Path, Path, Path]:
    import av
    import numpy as np
    import skimage.data
    from PIL import Image
    from skimage.transform import rotate

    img = skimage.data.astronaut()
    photo = folder / "astronaut.png"
    Image.fromarray(img).save(photo)
    blank = folder / "wall.png"
    Image.fromarray(np.full((160, 160, 3), 120, np.uint8)).save(blank)
    video = folder / "astronaut.mp4"
    crop = img[0:320, 80:400]
    with av.open(str(video), mode="w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.height, stream.width = crop.shape[:2]
        stream.pix_fmt = "yuv420p"
        for angle in (0, 8, 16, 8, 0):  # the picture rolls: the head's rotation must follow
            frame = (rotate(crop, angle, center=(160, 240), mode="edge") * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return photo, blank, video


def _reply_facts(bpy, scene, heads_before: set) -> dict:
    from mathutils import Vector

    new = [h for h in _heads(scene) if h.name not in heads_before]
    facts: dict = {"heads": len(new)}
    if not new:
        return facts
    head = new[0]
    cam = scene.camera
    bg = cam.data.background_images[0] if cam is not None and len(cam.data.background_images) else None
    source = None if bg is None else [bg.source, bg.image.name if bg.source == "IMAGE" else bg.clip.name]
    values = [v for v in (getattr(head.imhead.expressions, n) for n in head.imhead.expressions.bl_rna.properties.keys())
              if isinstance(v, float)]
    facts.update(vertices=len(head.data.vertices), scene_camera=cam is not None, camera_background=source,
                 lens_mm=cam.data.lens if cam else 0.0, resolution=[scene.render.resolution_x,
                                                                   scene.render.resolution_y],
                 animated=head.animation_data is not None and head.animation_data.action is not None,
                 max_expression=max(values))
    view = cam.matrix_world.to_3x3() @ Vector((0.0, 0.0, -1.0))
    facts["head_in_front"] = float((head.matrix_world.translation - cam.matrix_world.translation).dot(view))
    return facts


def scenario_footage(zip_path: str, folder: str) -> dict:
    import bpy

    photo, blank, video = _make_footage(Path(folder))
    module = _install(bpy, zip_path)
    service = sys.modules[f"{module}.backend_service"]
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    scene.imhead.resolution = 48
    facts: dict = {"objects_before": len(bpy.data.objects), "cameras_before": len(bpy.data.cameras)}

    # No face: an error message, nothing added.
    assert bpy.ops.imhead.head_from_footage(filepath=str(blank)) == {"FINISHED"}
    service.drain(600)
    facts["no_face_error"] = service.status()[1]
    facts["objects_after_error"] = len(bpy.data.objects)
    facts["cameras_after_error"] = len(bpy.data.cameras)
    service.clear_error()

    # Cancel once progress shows.
    assert bpy.ops.imhead.head_from_footage(filepath=str(photo), steps=400) == {"FINISHED"}
    job = service.jobs()[0]
    deadline = time.monotonic() + 600
    while job.future.progress <= 0.05 and not job.future.done() and time.monotonic() < deadline:
        service.pump_backend()
        time.sleep(0.02)
    facts["progress_seen"] = [job.future.progress, job.future.message]
    assert bpy.ops.imhead.cancel_job(request_id=job.request_id) == {"FINISHED"}
    service.drain(600)
    try:
        job.future.result()
        facts["cancel_code"] = "finished"
    except Exception as exc:
        facts["cancel_code"] = getattr(exc, "code", repr(exc))
    facts["objects_after_cancel"] = len(bpy.data.objects)

    # A photo.
    before = {h.name for h in _heads(scene)}
    assert bpy.ops.imhead.head_from_footage(filepath=str(photo), steps=10) == {"FINISHED"}
    service.drain(900)
    facts["photo"] = _reply_facts(bpy, scene, before)

    # A video.
    before = {h.name for h in _heads(scene)}
    assert bpy.ops.imhead.head_from_footage(filepath=str(video), steps=10) == {"FINISHED"}
    service.drain(900)
    facts["video"] = _reply_facts(bpy, scene, before)
    new = [h for h in _heads(scene) if h.name not in before]
    if new:
        head = new[0]
        scene.frame_set(scene.frame_start)
        r0 = tuple(head.rotation_euler)
        scene.frame_set(scene.frame_start + 2)
        r2 = tuple(head.rotation_euler)
        facts["video"]["rotation_changes"] = max(abs(a - b) for a, b in zip(r0, r2))
        facts["video"]["frame_end"] = scene.frame_end - scene.frame_start + 1
        facts["video"]["frames"] = 5
    facts["status"] = list(service.status())
    service.shutdown()
    return facts


if __name__ == "__main__":
    name, zip_arg, out_arg, folder = sys.argv[1:5]
    result = {"footage": scenario_footage}[name](zip_arg, folder)
    Path(out_arg).write_text(json.dumps(result, indent=1))
