"""Render the 39-region atlas with Blender (bpy module, Cycles CPU) to docs/atlas.png: the mean head from
the front and from its left side, one colour per region, region ids drawn at the visible anchors.

    .venv/bin/python tools/render_atlas.py --out docs/atlas.png [--atlas weights/atlas.safetensors]
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.atlas import load_atlas  # noqa: E402

WIDTH, HEIGHT, ORTHO = 1600, 900, 0.80       # pixels; orthographic view width in metres
VIEWS = (("front", -0.065, 0.0), ("left side", 0.245, -math.pi / 2))   # (name, x offset m, rotation about +Y)
CENTRE_Y = -0.024


def region_colours(n: int) -> np.ndarray:
    """Well separated hues (golden-ratio steps), alternating value so neighbours differ."""
    return np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.55 + 0.35 * (i % 3) / 2, 0.95 - 0.2 * (i % 2))
                     for i in range(n)])


def build_scene(atlas, colours: np.ndarray):
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    mesh = bpy.data.meshes.new("atlas")
    mesh.from_pydata(atlas.vertices.astype(float).tolist(), [], atlas.faces.tolist())
    mesh.update()
    attr = mesh.color_attributes.new("region", "FLOAT_COLOR", "CORNER")
    face_rgb = colours[atlas.face_region()]
    rgba = np.concatenate([np.repeat(face_rgb, 3, axis=0), np.ones((len(atlas.faces) * 3, 1))], 1)
    attr.data.foreach_set("color", rgba.astype(np.float32).ravel())
    mat = bpy.data.materials.new("region")
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = nodes["Principled BSDF"]
    node = nodes.new("ShaderNodeAttribute")
    node.attribute_name = "region"
    links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.7
    mesh.materials.append(mat)
    for name, x, rot in VIEWS:
        obj = bpy.data.objects.new(name, mesh)
        obj.location = (x, 0.0, 0.0)
        obj.rotation_mode = "XYZ"
        obj.rotation_euler = (0.0, rot, 0.0)
        scene.collection.objects.link(obj)
    # the camera at +Z looks along -Z with +Y up (zero rotation), i.e. straight at the face in data axes
    cam = bpy.data.cameras.new("cam")
    cam.type = "ORTHO"
    cam.ortho_scale = ORTHO
    cam_obj = bpy.data.objects.new("cam", cam)
    cam_obj.location = (0.0, CENTRE_Y, 1.0)
    scene.collection.objects.link(cam_obj)
    scene.camera = cam_obj
    suns = ((2.2, (math.radians(-25), math.radians(20), 0)), (0.8, (math.radians(20), math.radians(-60), 0)))
    for energy, sun_rot in suns:
        light = bpy.data.lights.new("sun", "SUN")
        light.energy = energy
        lo = bpy.data.objects.new("sun", light)
        lo.rotation_euler = sun_rot
        scene.collection.objects.link(lo)
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (1, 1, 1, 1)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.35
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.render.resolution_x, scene.render.resolution_y = WIDTH, HEIGHT
    scene.render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    return scene


def label_positions(atlas) -> list[tuple[int, float, float]]:
    """(region id, pixel x, pixel y) for anchors that face the camera in either view."""
    v = atlas.vertices.astype(np.float64)
    f = atlas.faces
    n = np.zeros_like(v)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    out = []
    scale = WIDTH / ORTHO
    for _, x0, rot in VIEWS:
        c, s = math.cos(rot), math.sin(rot)
        rmat = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        for r, vid in enumerate(atlas.anchor_vertex):
            p, nz = rmat @ v[vid], (rmat @ n[vid])[2]
            if nz > 0.35 and p[2] > -0.02:
                out.append((r, WIDTH / 2 + (p[0] + x0) * scale, HEIGHT / 2 - (p[1] - CENTRE_Y) * scale))
    return out


def main(argv: list[str] | None = None) -> int:
    import bpy
    from PIL import Image, ImageDraw

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atlas", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("docs/atlas.png"))
    args = p.parse_args(argv)
    atlas = load_atlas(args.atlas)
    colours = region_colours(len(atlas.names))
    scene = build_scene(atlas, colours)
    with tempfile.TemporaryDirectory() as tmp:
        scene.render.filepath = str(Path(tmp) / "render.png")
        bpy.ops.render.render(write_still=True)
        img = Image.open(scene.render.filepath).convert("RGB")
    draw = ImageDraw.Draw(img)
    for r, x, y in label_positions(atlas):
        text = str(r)
        draw.rectangle([x - 8, y - 7, x + 8 + 6 * (len(text) - 1), y + 7], fill=(255, 255, 255))
        draw.text((x - 5, y - 6), text, fill=(0, 0, 0))
    legend_x = 8
    for r, name in enumerate(atlas.names):
        y = 8 + 14 * (r % 20)
        x = legend_x + (0 if r < 20 else 170)
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(255 * c) for c in colours[r]))
        draw.text((x + 14, y - 1), f"{r} {name}", fill=(0, 0, 0))
    draw.text((8, HEIGHT - 20), "left: front view (subject's left on the image right); right: subject's left side",
              fill=(0, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
