"""The photo-fit picture for docs/capture.md: the photo with its detected landmarks (green) and the fitted
head's landmarks (red), the fitted head rendered with Blender (Cycles, CPU) through the fitted camera and pose,
and the two blended.

    .venv/bin/python -m backend fit-image photo.png --head head.json --frames frames.json
    .venv/bin/python tools/render_capture_docs.py photo.png head.json frames.json -o docs/pictures/x.png

Not shipped, not a test."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def posed_head(head_path: Path, frame: dict, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted head with the frame's expression, model frame (backend axes)."""
    from backend.engine.session import Session

    s = Session(device="cpu")
    head = json.loads(head_path.read_text())
    head["expression"] = frame["expression"]
    _, arrays = s.generate({"head": head, "resolution": resolution}, {})
    return arrays["vertices"], arrays["faces"]


def render(vertices_cam: np.ndarray, faces: np.ndarray, camera: dict, out: Path, samples: int) -> np.ndarray:
    """Render a mesh given in the camera frame (camera at the origin looking down -Z, +Y up)."""
    import bpy
    from skimage.io import imread

    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    me = bpy.data.meshes.new("head")
    me.vertices.add(len(vertices_cam))
    me.loops.add(faces.size)
    me.polygons.add(len(faces))
    me.vertices.foreach_set("co", vertices_cam.astype(np.float32).ravel())
    me.loops.foreach_set("vertex_index", faces.astype(np.int32).ravel())
    me.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    me.polygons.foreach_set("loop_total", np.full(len(faces), 3, np.int32))
    me.update()
    me.shade_smooth()
    mat = bpy.data.materials.new("clay")
    mat.diffuse_color = (0.62, 0.6, 0.58, 1.0)  # type: ignore[assignment]  # stubs: bpy_prop_array, no tuple
    me.materials.append(mat)
    sc.collection.objects.link(bpy.data.objects.new("head", me))
    cam = bpy.data.cameras.new("camera")
    cam.sensor_fit, cam.sensor_width = "HORIZONTAL", 36.0
    cam.lens = camera["focal_px"] * 36.0 / camera["width"]
    cam.clip_start = 0.01
    cam_ob = bpy.data.objects.new("camera", cam)  # identity: looks down -Z with +Y up, as the fit's camera
    sc.collection.objects.link(cam_ob)
    sc.camera = cam_ob
    sun = bpy.data.lights.new("sun", "SUN")
    sun.energy = 3.5
    sun_ob = bpy.data.objects.new("sun", sun)
    sun_ob.rotation_euler = (0.5, -0.4, 0.0)
    sc.collection.objects.link(sun_ob)
    world = bpy.data.worlds.new("world")
    world.color = (0.08, 0.08, 0.09)
    sc.world = world
    sc.render.engine = "CYCLES"
    sc.cycles.device, sc.cycles.samples = "CPU", samples
    sc.render.resolution_x, sc.render.resolution_y = camera["width"], camera["height"]
    sc.render.film_transparent = True
    sc.view_settings.view_transform = "Standard"
    sc.render.filepath = str(out)
    bpy.ops.render.render(write_still=True)
    return imread(out)


def draw_points(img: np.ndarray, pts: np.ndarray, colour: tuple[int, int, int], r: int = 3) -> None:
    h, w = img.shape[:2]
    for x, y in np.round(pts).astype(int):
        img[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)] = colour


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo", type=Path)
    parser.add_argument("head", type=Path)
    parser.add_argument("frames", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    from PIL import Image

    data = json.loads(args.frames.read_text())
    frame, camera = data["frames"][0], data["camera"]
    verts, faces = posed_head(args.head, frame, args.resolution)
    rot, trans = np.asarray(frame["rotation"]), np.asarray(frame["translation"])
    rendered = render(verts @ rot.T + trans, faces, camera, args.output.with_suffix(".render.png"), args.samples)
    photo = np.asarray(Image.open(args.photo).convert("RGB")).copy()
    head_rgb = rendered[..., :3].astype(np.float32)
    alpha = rendered[..., 3:4].astype(np.float32) / 255.0
    head_on_black = (head_rgb * alpha).astype(np.uint8)
    blend = (photo * (1 - 0.6 * alpha) + head_rgb * 0.6 * alpha).astype(np.uint8)
    marked = photo.copy()
    draw_points(marked, np.asarray(frame["landmarks_px"]), (40, 230, 60))
    draw_points(marked, np.asarray(frame["fitted_landmarks_px"]), (240, 40, 40), r=2)
    draw_points(blend, np.asarray(frame["fitted_landmarks_px"]), (240, 40, 40), r=2)
    Image.fromarray(np.concatenate([marked, head_on_black, blend], 1)).save(args.output)
    args.output.with_suffix(".render.png").unlink()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
