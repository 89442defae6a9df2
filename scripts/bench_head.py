"""Time a complete head in Blender: the extension installed from the built zip (headless bpy, isolated user
folders), the backend warm, then Generate -> a head with skin material, eyes, teeth, gums and tongue.

    .venv/bin/python scripts/bench_head.py [--zip dist/imhead-X.zip] [--resolution 128] [--repeats 3]

Without --zip it builds one from the working tree (build.py into a temporary folder). Prints the medians of the
repeats: the whole click-to-head time, the backend's share (the generate reply) and the add-on's (mesh, parts,
materials), last as one JSON line; `python -m backend bench` runs this and adds the row to its table.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zip", type=Path, help="extension zip (default: newest dist/imhead-*.zip)")
    p.add_argument("--python", default=sys.executable, help="python with torch that runs the backend")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("AUTO", "CPU", "GPU"), default="CPU")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imhead_bench_"))
    if args.zip is None:
        subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(work), "--python", args.python],
                       check=True, capture_output=True)
        args.zip = next(work.glob("imhead-*.zip"))
    zip_path = args.zip.resolve()
    demo.isolate_user_dirs(work / "blender_user")

    import bpy

    module = demo.install_extension(bpy, zip_path)
    prefs = bpy.context.preferences.addons[module].preferences
    prefs.python_path, prefs.device = args.python, args.device
    service = sys.modules[f"{module}.backend_service"]
    demo.clear_scene(bpy)
    scene = bpy.context.scene
    scene.imhead.resolution = 32
    bpy.ops.imhead.generate()  # start and warm the backend; not timed
    service.drain(600)

    total, apply = [], []
    scene.imhead.resolution = args.resolution
    for seed in range(args.repeats):
        scene.imhead.seed = 100 + seed
        t0 = time.perf_counter()
        bpy.ops.imhead.generate()
        job = service.jobs()[0]
        applied = job.on_success
        spent: list[float] = []

        def timed(params, arrays, applied=applied, spent=spent):
            t = time.perf_counter()
            applied(params, arrays)
            spent.append(time.perf_counter() - t)

        job.on_success = timed
        service.drain(600)
        total.append(time.perf_counter() - t0)
        apply.append(spent[0])
    head = [o for o in scene.objects if o.imhead.is_head][-1]
    parts = sorted(c["imhead_part"] for c in head.children if "imhead_part" in c.keys())
    if len(parts) != 6 or not head.data.materials:
        sys.exit(f"incomplete head: parts {parts}, materials {list(head.data.materials)}")
    hs = service.handshake()
    t, a = statistics.median(total), statistics.median(apply)
    print(f"complete head (skin, eyes, teeth, materials) on {hs.torch_device} at {args.resolution}^3: {t:.2f} s "
          f"(backend {t - a:.2f} s + add-on {a:.2f} s; median of {args.repeats})")
    print(json.dumps({"device": hs.torch_device, "resolution": args.resolution, "total_s": t, "addon_s": a,
                      "repeats": args.repeats, "vertices": len(head.data.vertices)}))
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
