"""Headless demo: install the built extension into Blender (the bpy module) with an isolated user config,
press the sidebar's Generate operator (a head with eyes, teeth and materials), then light, save and render it
with Cycles; then make its 52 ARKit shape keys, import a short face capture (Live Link Face CSV), export
out/demo.glb (morph targets + animation) and render a contact sheet of the animation, out/demo_anim.png.

Run with the venv's python (it has bpy and is also the backend's python):
    .venv/bin/python scripts/demo.py [--zip dist/imhead-X.zip] [--seed 7] [--resolution 192]
"""

import argparse
import glob
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
USER_DIRS = ("CONFIG", "SCRIPTS", "EXTENSIONS", "DATAFILES")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zip", type=Path, help="extension zip (default: newest dist/imhead-*.zip)")
    p.add_argument("--out", type=Path, default=ROOT / "out", help="output folder (default: out/)")
    p.add_argument("--python", default=sys.executable, help="python with torch that runs the backend")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--resolution", type=int, default=192)
    p.add_argument("--size", type=int, default=768, help="square image size in pixels")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--engine", choices=("CYCLES", "BLENDER_EEVEE"), default="CYCLES")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the backend")
    p.add_argument("--capture", type=Path, default=ROOT / "scripts" / "demo_capture.csv",
                   help="face capture CSV (Live Link Face layout) to animate the head with")
    p.add_argument("--sheet-frames", type=int, default=8, help="animation frames on the contact sheet (>= 6)")
    p.add_argument("--sheet-size", type=int, default=256, help="square size of each contact-sheet frame")
    p.add_argument("--sheet-samples", type=int, default=16)
    p.add_argument("--update-docs", action="store_true", help="also copy the pictures to docs/")
    return p.parse_args()


def isolate_user_dirs(base: Path) -> None:
    """Blender reads these before bpy is imported: keep the user's own config and extensions out of it."""
    if base.exists():
        shutil.rmtree(base)
    os.environ["BLENDER_USER_RESOURCES"] = str(base)
    for kind in USER_DIRS:
        path = base / kind.lower()
        path.mkdir(parents=True)
        os.environ[f"BLENDER_USER_{kind}"] = str(path)


def newest_zip() -> Path:
    zips = sorted(glob.glob(str(ROOT / "dist" / "imhead-*.zip")), key=os.path.getmtime)
    if not zips:
        sys.exit("no dist/imhead-*.zip: run `python build.py` first")
    return Path(zips[-1])


def install_extension(bpy, zip_path: Path) -> str:
    """Install from disk into the user repository and return the add-on's module name."""
    before = {a.module for a in bpy.context.preferences.addons}
    result = bpy.ops.extensions.package_install_files(
        filepath=str(zip_path), repo="user_default", enable_on_install=True, overwrite=True)
    if result != {"FINISHED"}:
        sys.exit(f"installing {zip_path} failed: {result}")
    added = [m for m in {a.module for a in bpy.context.preferences.addons} - before if m.startswith("bl_ext.")]
    if len(added) != 1:
        sys.exit(f"expected the extension to be enabled once, got {added}")
    return added[0]


def clear_scene(bpy) -> None:
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)


def frame_head(bpy, obj, scene, size: int) -> None:
    """Camera on the face side (-Y in Blender) in a slight three-quarter view, framed on the head's bounds."""
    from mathutils import Vector

    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    lo = Vector((min(c.x for c in corners), min(c.y for c in corners), min(c.z for c in corners)))
    hi = Vector((max(c.x for c in corners), max(c.y for c in corners), max(c.z for c in corners)))
    center, extent = (lo + hi) / 2, hi - lo
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 85.0
    cam_data.sensor_width = 36.0
    half_fov = math.atan(cam_data.sensor_width / 2 / cam_data.lens)
    distance = 1.25 * max(extent.x, extent.z) / 2 / math.tan(half_fov) + extent.y / 2
    yaw, pitch = math.radians(20.0), math.radians(8.0)
    offset = Vector((math.sin(yaw) * math.cos(pitch), -math.cos(yaw) * math.cos(pitch), math.sin(pitch)))
    cam = bpy.data.objects.new("Camera", cam_data)
    cam.location = center + distance * offset
    cam.rotation_euler = (center - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(cam)
    scene.camera = cam

    def area_light(name, energy, size_m, direction, color):
        data = bpy.data.lights.new(name, "AREA")
        data.energy, data.size, data.color = energy, size_m, color
        light = bpy.data.objects.new(name, data)
        light.location = center + 1.2 * Vector(direction).normalized()
        light.rotation_euler = (center - light.location).to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(light)

    area_light("Key", 22.0, 0.6, (-0.9, -1.0, 0.8), (1.0, 0.93, 0.85))
    area_light("Fill", 3.5, 1.2, (1.0, -0.7, 0.0), (0.8, 0.88, 1.0))
    area_light("Rim", 30.0, 0.5, (0.6, 1.0, 0.9), (1.0, 0.97, 0.92))

    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100


def setup_render(bpy, scene, samples: int, out_png: Path, engine: str = "CYCLES") -> None:
    scene.render.engine = engine
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = True
    scene.eevee.taa_render_samples = samples
    scene.render.film_transparent = False
    world = bpy.data.worlds.new("World")
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.06, 0.065, 0.075, 1.0)
    scene.world = world
    scene.view_settings.view_transform = "AgX"
    scene.view_settings.look = "AgX - Medium High Contrast"
    scene.cycles.max_bounces = 4
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(out_png)


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    zip_path = (args.zip or newest_zip()).resolve()
    isolate_user_dirs(out / "blender_user")

    import bpy  # only now: Blender picks its user folders at import

    module = install_extension(bpy, zip_path)
    addon = bpy.context.preferences.addons[module]
    addon.preferences.python_path = args.python
    service = sys.modules[f"{module}.backend_service"]
    print(f"installed {zip_path.name} as {module}; backend python {args.python}")

    clear_scene(bpy)
    scene = bpy.context.scene
    scene.imhead.seed, scene.imhead.resolution = args.seed, args.resolution
    t0 = time.monotonic()
    if bpy.ops.imhead.generate() != {"FINISHED"}:
        sys.exit("the Generate operator did not start")
    # Headless Blender runs no timers: pump the replies ourselves, as the add-on's timer would.
    service.drain(args.timeout)
    state, text = service.status()
    heads = [o for o in scene.objects if o.imhead.is_head]
    if not heads:
        sys.exit(f"no head was created: {state} {text}")
    head = heads[0]
    hs = service.handshake()
    print(f"generated {head.name}: {len(head.data.vertices)} vertices, {len(head.data.polygons)} faces "
          f"in {time.monotonic() - t0:.1f} s (backend {hs.model_name} on {hs.torch_device}, "
          f"{'trained' if hs.trained else 'UNTRAINED'} weights)")

    frame_head(bpy, head, scene, args.size)
    png = out / "demo.png"
    setup_render(bpy, scene, args.samples, png, args.engine)
    blend = out / "demo.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    t0 = time.monotonic()
    bpy.ops.render.render(write_still=True)
    print(f"saved {blend}; rendered {png} in {time.monotonic() - t0:.1f} s")

    animate(bpy, sys.modules[f"{module}.deform_jobs"], service, scene, head, args, out)
    service.shutdown()
    if args.update_docs:
        for name in ("demo.png", "demo_anim.png"):
            shutil.copyfile(out / name, ROOT / "docs" / name)
            print(f"copied to {ROOT / 'docs' / name}")
    return 0


def animate(bpy, deform_jobs, service, scene, head, args, out: Path) -> None:
    """ARKit shape keys (the panel's button), the capture through File > Import's operator, glTF export, and a
    contact sheet of the animation rendered from the shape keys (no backend needed for the last two)."""
    t0 = time.monotonic()
    if bpy.ops.imhead.arkit_shape_keys() != {"FINISHED"}:
        sys.exit("the ARKit shape keys operator did not start")
    shown = None

    def report() -> bool:
        nonlocal shown
        chains = deform_jobs.running(head.name)
        if chains and (chains[0].done, chains[0].total) != shown:
            shown = (chains[0].done, chains[0].total)
            print(f"ARKit shape keys: {shown[0]}/{shown[1]} frames", flush=True)
        return not chains and not service.jobs()

    service.drain(args.timeout, until=report)
    keys = head.data.shape_keys
    if keys is None or len(keys.key_blocks) != 53:
        sys.exit(f"expected Basis + 52 ARKit shape keys: {service.status()}")
    print(f"made 52 ARKit shape keys in {time.monotonic() - t0:.1f} s")

    scene.frame_start = scene.frame_end = 1  # the import grows the range to the capture's
    if bpy.ops.imhead.import_capture(filepath=str(args.capture.resolve())) != {"FINISHED"}:
        sys.exit(f"importing {args.capture} failed")
    if bpy.ops.imhead.keyframe_shape_keys() != {"FINISHED"}:
        sys.exit("keyframing the shape keys failed")
    print(f"imported {args.capture.name}: frames {scene.frame_start}-{scene.frame_end} at {scene.render.fps} fps")
    for obj in scene.objects:
        obj.select_set(obj == head)
    glb = out / "demo.glb"
    bpy.ops.export_scene.gltf(filepath=str(glb), export_format="GLB", use_selection=True, export_morph=True,
                              export_animations=True)
    print(f"wrote {glb} ({glb.stat().st_size / 1e6:.1f} MB)")

    t0 = time.monotonic()
    count = max(6, args.sheet_frames)
    span = scene.frame_end - scene.frame_start
    frames = sorted({scene.frame_start + round(i * span / (count - 1)) for i in range(count)})
    scene.render.resolution_x = scene.render.resolution_y = args.sheet_size
    scene.cycles.samples = args.sheet_samples
    tiles = []
    for frame in frames:
        scene.frame_set(frame)
        scene.render.filepath = str(out / f"demo_anim_{frame:04d}.png")
        bpy.ops.render.render(write_still=True)
        image = bpy.data.images.load(scene.render.filepath)
        tiles.append(np.array(image.pixels[:], dtype=np.float32).reshape(args.sheet_size, args.sheet_size, 4))
        bpy.data.images.remove(image)
        Path(scene.render.filepath).unlink()
    sheet = contact_sheet(tiles, columns=4)
    image = bpy.data.images.new("demo_anim", sheet.shape[1], sheet.shape[0], alpha=True)
    image.pixels.foreach_set(sheet.ravel())
    image.filepath_raw = str(out / "demo_anim.png")
    image.file_format = "PNG"
    image.save()
    print(f"rendered frames {frames} into {out / 'demo_anim.png'} in {time.monotonic() - t0:.1f} s")


def contact_sheet(tiles: list, columns: int):
    """Tiles (H,W,4, bottom row first as Blender stores pixels) in rows of `columns`, left to right and top to
    bottom, with a 4-pixel gutter."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    gap = 4
    sheet = np.zeros((rows * h + (rows + 1) * gap, columns * w + (columns + 1) * gap, 4), dtype=np.float32)
    sheet[..., 3] = 1.0
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        top = sheet.shape[0] - (r + 1) * (h + gap)  # Blender's rows run bottom to top
        left = gap + c * (w + gap)
        sheet[top : top + h, left : left + w] = tile
    return sheet


if __name__ == "__main__":
    sys.exit(main())
