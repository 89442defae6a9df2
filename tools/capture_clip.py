"""Render the known-answer clip for the photo/video fit (docs/capture.md) with Blender (Cycles on CPU):

    .venv/bin/python tools/capture_clip.py --out DIR [--frames 18] [--fps 6] [--size 512] [--seed 5]
        [--curve NAME=PEAK ...]

A generated head (identity `--seed`) as `generate` delivers it, posed per frame through the `deform` op by an
expression curve (jawOpen, mouthSmile_L/R, browInnerUp_L/R; `--curve` names other expressions and peaks, e.g.
`--curve jawOpen=0.6` for a clip that moves the jaw alone), turns about its vertical axis by +-30 degrees in
front of a fixed camera on a plain background, with a procedural skin texture and painted eyebrows, lips and
irises (features_colour). Writes DIR/frame_NNN.png, DIR/clip.mp4 (PyAV, H.264) and DIR/truth.json (identity,
per-frame expression weights and yaw, the camera). Not shipped; the known-answer test
(tests/test_capture_known_answer.py) runs it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES = "features"  # the head's colour attribute of painted features (features_colour)
BROW_HALF_M, BROW_EDGE_M = 0.0045, 0.002  # an eyebrow's half height at its widest, its soft edge
IRIS_DEG, PUPIL_DEG = 24.0, 9.0  # iris and pupil radii as angles about the eye's centre from straight ahead
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
    # the painted face (features_colour) over the skin, by its alpha
    paint = nodes.new("ShaderNodeAttribute")
    paint.attribute_type, paint.attribute_name = "GEOMETRY", FEATURES
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    links.new(paint.outputs["Alpha"], mix.inputs["Factor"])
    links.new(ramp.outputs["Color"], mix.inputs[6])  # A (colour sockets of the RGBA mode)
    links.new(paint.outputs["Color"], mix.inputs[7])  # B
    links.new(mix.outputs[2], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.6
    return sc, mat


def features_colour(template: np.ndarray, region: np.ndarray, names: list[str], atlas_vertices: np.ndarray,
                    weights_dir: Path) -> np.ndarray:
    """(N, 4) RGBA painted over the skin at vertices with template positions (N, 3) and atlas regions (N,):
    eyebrows along the 68-point markup's brow points, red lips inside the template's outer lip contour (the
    add-on's lip weight), and irises and pupils on the eyeballs (the add-on's eye centres), so that the
    landmark detector sees a face's features as it does on a real person; alpha 0 elsewhere."""
    from safetensors.numpy import load_file

    from backend.capture.correspondence import ICT_MULTIPIE68
    from imhead_blender.face_parts import lip_weight

    parts = load_file(str(weights_dir / "face_parts.safetensors"))
    rgba = np.zeros((len(template), 4), np.float32)

    def paint(weight: np.ndarray, colour: tuple[float, float, float]) -> None:
        w = np.clip(weight, 0.0, 1.0)[:, None]
        rgba[:, :3] = rgba[:, :3] * (1 - w) + np.asarray(colour) * w
        rgba[:, 3:] = np.maximum(rgba[:, 3:], w)

    front = template[:, 2] > 0.06
    for brow in ((17, 18, 19, 20, 21), (22, 23, 24, 25, 26)):  # each brow's polyline, thicker in the middle
        pts = atlas_vertices[[ICT_MULTIPIE68[i] for i in brow]].astype(np.float64)
        a, b = pts[:-1, :2], pts[1:, :2]
        q = template[:, None, :2] - a
        t = np.clip((q * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0.0, 1.0)
        dist = np.linalg.norm(q - t[..., None] * (b - a), axis=-1)
        seg = dist.argmin(1)
        along = (seg + t[np.arange(len(t)), seg]) / len(a)  # 0 .. 1 from the inner to the outer end
        half = BROW_HALF_M * (1.0 - 0.6 * np.abs(along - 0.35) / 0.65)
        paint(front * np.clip((half - dist.min(1)) / BROW_EDGE_M + 0.5, 0.0, 1.0), (0.10, 0.06, 0.04))
    paint(lip_weight(template.astype(np.float64), parts["lip_contour"]), (0.62, 0.22, 0.22))
    for centre, radius, name in zip(parts["eye_centre"], parts["eye_radius"], ("left eyeball", "right eyeball")):
        on = region == names.index(name)
        d = template - centre
        angle = np.degrees(np.arccos(np.clip(d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-9), -1.0, 1.0)))
        paint(on * 1.0, (0.85, 0.82, 0.78))  # sclera
        paint(on * np.clip((IRIS_DEG - angle) / 2.0 + 0.5, 0.0, 1.0), (0.28, 0.17, 0.09))
        paint(on * np.clip((PUPIL_DEG - angle) / 2.0 + 0.5, 0.0, 1.0), (0.02, 0.02, 0.02))
    return rgba


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
    parser.add_argument("--size", type=int, default=512)
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
    from backend.weights import default_weights_dir

    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(weights_dir=args.weights, device="cpu")
    head = HeadSpec(identity=s.sample_identity(args.seed))
    # the head as `generate` delivers it (neck cut, lips and lids slit): a closed canonical mesh tears at the
    # mouth under jawOpen into spikes that no head of the product shows
    _, mesh = s.generate({"head": head.to_dict(), "resolution": args.resolution}, {})
    unknown = set(curve) - set(s.expression_names)
    if unknown:
        raise SystemExit(f"--curve: no such expression {sorted(unknown)}")
    weights, yaw = truth(args.frames, s.expression_names, curve)
    _, posed = s.deform({"head": head.to_dict()}, {"canonical": mesh["vertices"], "expressions": weights})
    sc, mat = build_scene(args.size)
    ob = head_object(np.zeros_like(mesh["vertices"]), mesh["faces"], mat, sc)
    rgba = features_colour(mesh["template"], mesh["region"], s.region_names, s.atlas.vertices,
                           args.weights or default_weights_dir())
    attr = ob.data.color_attributes.new(FEATURES, "FLOAT_COLOR", "POINT")
    attr.data.foreach_set("color", rgba.ravel())
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
