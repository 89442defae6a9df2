"""README picture of what an artist gets: three generated heads side by side (placed by Generate itself), each
with its skin tone, eyes, teeth and materials, one smiling with the jaw open, one looking aside; rendered with
Cycles or EEVEE through the installed extension (headless bpy).

    .venv/bin/python tools/render_artist.py [--engine CYCLES|BLENDER_EEVEE] [--out docs/pictures/artist.png]
"""

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402

HEADS: tuple[tuple[int, float, float, dict[str, float]], ...] = (  # seed, skin tone, iris hue, expression weights
    (7, 0.15, 0.5, {}),
    (12, 0.55, 0.12, {"jawOpen": 0.25, "mouthSmile_L": 0.7, "mouthSmile_R": 0.7}),
    (3, 0.85, 0.1, {"eyeLookOut_L": 0.5, "eyeLookIn_R": 0.5, "browInnerUp_L": 0.3, "browInnerUp_R": 0.3}),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("CYCLES", "BLENDER_EEVEE"), default="CYCLES")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "pictures" / "artist.png")
    p.add_argument("--resolution", type=int, default=160)
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--samples", type=int, default=48)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imhead_render_"))
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(work)], check=True, capture_output=True)
    demo.isolate_user_dirs(work / "blender_user")

    import bpy
    from mathutils import Vector

    module = demo.install_extension(bpy, next(work.glob("imhead-*.zip")))
    bpy.context.preferences.addons[module].preferences.python_path = sys.executable
    service = sys.modules[f"{module}.backend_service"]
    demo.clear_scene(bpy)
    scene = bpy.context.scene
    scene.imhead.resolution = args.resolution
    heads = []
    for seed, tone, hue, weights in HEADS:
        scene.imhead.seed = seed
        bpy.ops.imhead.generate()
        service.drain(900)
        head = [o for o in scene.objects if o.imhead.is_head and o not in heads][0]
        head.imhead.skin_tone, head.imhead.iris_hue = tone, hue
        for name, w in weights.items():
            setattr(head.imhead.expressions, name, w)
        service.drain(900)
        heads.append(head)
    bpy.context.view_layer.update()

    # One camera over all three (demo.frame_head frames one object: give it the middle head, then widen).
    demo.frame_head(bpy, heads[1], scene, args.width)
    scene.render.resolution_y = int(args.width * 0.42)
    cam = scene.camera
    centre = sum((h.matrix_world.translation for h in heads), Vector()) / len(heads)
    centre.z = heads[1].matrix_world.translation.z + 0.02
    spread = (heads[-1].matrix_world.translation - heads[0].matrix_world.translation).length + 0.32
    cam.data.lens = 85.0
    distance = spread / 2 / math.tan(math.atan(18.0 / 85.0)) * 1.05
    cam.location = centre + Vector((0.0, -distance, 0.05))
    cam.rotation_euler = (centre - cam.location).to_track_quat("-Z", "Y").to_euler()
    for light in (o for o in scene.objects if o.type == "LIGHT"):
        light.location = centre + 1.6 * (light.location - heads[1].matrix_world.translation)
        light.data.energy *= 2.0
        light.rotation_euler = (centre - light.location).to_track_quat("-Z", "Y").to_euler()
    demo.setup_render(bpy, scene, args.samples, args.out.resolve(), args.engine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.render.render(write_still=True)
    print(f"rendered {args.out}")
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
