"""Render the known-answer clip for the photo/video fit (docs/capture.md) with Blender (Cycles on CPU):

    .venv/bin/python tools/capture_clip.py --out DIR [--frames 18] [--fps 6] [--size 192] [--seed 5]
        [--curve NAME=PEAK ...]

A generated head (identity `--seed`), posed per frame through the `deform` op by an expression curve
(jawOpen, mouthSmile_L/R, browInnerUp_L/R; `--curve` names other expressions and peaks, e.g. `--curve
jawOpen=0.6` for a clip that moves the jaw alone), turns about its vertical axis by +-30 degrees in front of a fixed
camera on a plain background, with a procedural skin texture. Writes DIR/frame_NNN.png, DIR/clip.mp4 (PyAV,
H.264) and DIR/truth.json (identity, per-frame expression weights and yaw, the camera). Not shipped; the
known-answer test (tests/test_capture_known_answer.py) runs it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CURVE = {"jawOpen": 0.6, "mouthSmile_L": 0.5, "mouthSmile_R": 0.5, "browInnerUp_L": 0.7, "browInnerUp_R": 0.7}
YAW_DEG = 30.0
DISTANCE = 0.75  # m, camera to the model origin
LENS_MM = 70.0
SENSOR_MM = 36.0


def truth(frames: int, names: list[str], curve: dict[str, float] = CURVE) -> tuple[np.ndarray, np.ndarray]:
    """Expression weights (T, 53) and yaw in degrees (T,): the mouth opens and closes once, the smile and the
    brows follow phase-shifted bumps (each pair of `curve`'s entries a later phase), the head turns right,
    left and back."""
    t = np.arange(frames) / max(frames - 1, 1)
    w = np.zeros((frames, len(names)), np.float32)
    for i, (name, peak) in enumerate(curve.items()):
        phase = (t - 0.15 * (i // 2)) % 1.0
        w[:, names.index(name)] = peak * np.sin(np.pi * phase) ** 2
    yaw = YAW_DEG * np.sin(2 * np.pi * t)
    return w, yaw.astype(np.float32)


def build_scene(size: int):
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    cam = bpy.data.cameras.new("camera")
    cam.lens, cam.sensor_width, cam.sensor_fit = LENS_MM, SENSOR_MM, "HORIZONTAL"
    cam_ob = bpy.data.objects.new("camera", cam)
    sc.collection.objects.link(cam_ob)
    cam_ob.location = (0.0, -DISTANCE, 0.0)  # backend +Z is Blender -Y: the camera faces the head
    cam_ob.rotation_euler = (math.pi / 2, 0.0, 0.0)
    sc.camera = cam_ob
    for energy, rot in ((3.0, (1.0, 0.2, 0.5)), (1.0, (1.3, 0.0, -1.2))):
        sun = bpy.data.lights.new("sun", "SUN")
        sun.energy = energy
        ob = bpy.data.objects.new("sun", sun)
        ob.rotation_euler = rot
        sc.collection.objects.link(ob)
    world = bpy.data.worlds.new("world")
    world.color = (0.25, 0.25, 0.25)
    sc.world = world
    sc.render.engine = "CYCLES"
    sc.cycles.device, sc.cycles.samples = "CPU", 8
    sc.cycles.use_denoising = False
    sc.render.resolution_x = sc.render.resolution_y = size
    sc.render.film_transparent = False
    sc.view_settings.view_transform = "Standard"
    mat = bpy.data.materials.new("skin")
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    noise = nodes.new("ShaderNodeTexNoise")
    noise.inputs["Scale"].default_value = 180.0
    ramp = nodes.new("ShaderNodeValToRGB")
    ramp.color_ramp.elements[0].color = (0.55, 0.33, 0.25, 1.0)
    ramp.color_ramp.elements[1].color = (0.80, 0.55, 0.45, 1.0)
    links.new(noise.outputs["Fac"], ramp.inputs["Fac"])
    bsdf = nodes["Principled BSDF"]
    links.new(ramp.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.6
    return sc, mat


def head_object(vertices: np.ndarray, faces: np.ndarray, mat, sc):
    import bpy

    me = bpy.data.meshes.new("head")
    me.vertices.add(len(vertices))
    me.loops.add(faces.size)
    me.polygons.add(len(faces))
    me.loops.foreach_set("vertex_index", faces.astype(np.int32).ravel())
    me.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    me.polygons.foreach_set("loop_total", np.full(len(faces), 3, np.int32))
    me.vertices.foreach_set("co", vertices.astype(np.float32).ravel())
    me.update()
    me.shade_smooth()
    me.materials.append(mat)
    ob = bpy.data.objects.new("head", me)
    sc.collection.objects.link(ob)
    return ob


def write_mp4(frames: list[np.ndarray], fps: int, path: Path) -> None:
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=18)
    parser.add_argument("--fps", type=int, default=6)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=128, help="extraction resolution of the rendered head")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--curve", action="append", default=[], metavar="NAME=PEAK",
                        help="an animated expression and its peak weight (repeat); default: " + ", ".join(
                            f"{k}={v}" for k, v in CURVE.items()))
    args = parser.parse_args()
    curve = {name: float(peak) for name, _, peak in (c.partition("=") for c in args.curve)} or CURVE

    import bpy
    from skimage.io import imread

    from backend.engine.head import HeadSpec
    from backend.engine.session import Session

    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(weights_dir=args.weights, device="cpu")
    head = HeadSpec(identity=s.sample_identity(args.seed))
    _, zr, k = s.decode(head)
    mesh, _, _ = s.canonical_mesh(zr, k, args.resolution)
    unknown = set(curve) - set(s.expression_names)
    if unknown:
        raise SystemExit(f"--curve: no such expression {sorted(unknown)}")
    weights, yaw = truth(args.frames, s.expression_names, curve)
    _, posed = s.deform({"head": head.to_dict()}, {"canonical": mesh.vertices, "expressions": weights})
    sc, mat = build_scene(args.size)
    ob = head_object(np.zeros_like(mesh.vertices), mesh.faces, mat, sc)
    frames = []
    for t in range(args.frames):
        v = posed["vertices"][t]
        ob.data.vertices.foreach_set("co", np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1).astype(np.float32).ravel())
        ob.data.update()
        ob.rotation_euler = (0.0, 0.0, math.radians(float(yaw[t])))  # backend +Y (up) is Blender +Z
        sc.render.filepath = str(args.out / f"frame_{t:03d}.png")
        bpy.ops.render.render(write_still=True)
        frames.append(np.ascontiguousarray(imread(sc.render.filepath)[..., :3]))
    write_mp4(frames, args.fps, args.out / "clip.mp4")
    focal_px = LENS_MM / SENSOR_MM * args.size
    (args.out / "truth.json").write_text(json.dumps({
        "identity": head.identity.tolist(), "expressions": weights.tolist(), "yaw_deg": yaw.tolist(),
        "camera": {"focal_px": focal_px, "distance_m": DISTANCE, "size": args.size, "fps": args.fps},
        "seed": args.seed, "resolution": args.resolution}))
    print(f"rendered {args.frames} frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
