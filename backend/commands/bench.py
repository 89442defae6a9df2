"""`imhead bench [--cpu-only] [--sizes 64,128,256,512] [--no-fit] [--no-cold]`: print one markdown
table of extraction (ours vs the NPHM-style dense baseline, same run), deform, fit, cold start, peak memory and a
complete head in Blender (skin, eyes, teeth, materials; 128^3 on CPU, 256^3 on GPU) on the CPU and, when
available, the GPU (see backend/engine/bench.py)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is available")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU rows")
    parser.add_argument("--sizes", type=_sizes, default="64,128,256,512",
                        help="extraction resolutions (comma-separated)")
    parser.add_argument("--cpu-sizes", type=_sizes, default=None,
                        help="resolutions for the CPU rows (default: --sizes)")
    parser.add_argument("--dense-max-points", type=int, default=None,
                        help="largest lattice evaluated densely for the baseline (default 3M on GPU, 300k on CPU); "
                             "beyond it the baseline is extrapolated from a 1M-point slice")
    parser.add_argument("--frames", type=int, default=8, help="expression frames for the GPU deform row")
    parser.add_argument("--cpu-frames", type=int, default=2, help="expression frames for the CPU deform row")
    parser.add_argument("--no-fit", action="store_true", help="skip the fit rows")
    parser.add_argument("--bake-frames", type=int, default=250,
                        help="frames of the 128^3 bake row (the add-on's chunked Bake; 0 skips it)")
    parser.add_argument("--capture-tracks", type=Path, default=None, metavar="FILE.npz",
                        help="tracked clips for the photo/video rows where mediapipe or PyAV is not installed "
                             "(`python -m backend.capture.bench --save-tracks FILE.npz` writes them; "
                             "default: none, the rows are skipped there)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start rows")
    parser.add_argument("--no-head", action="store_true",
                        help="skip the complete-head row (real Blender: the bpy module and scripts/bench_head.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder with imhead.safetensors and atlas.safetensors (default: the repository's "
                             "weights/)")


def _sizes(text: str) -> list[int]:
    from ..engine.cli import resolution

    sizes = [resolution(s.strip()) for s in text.split(",") if s.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated resolutions, got {text!r}")
    return sizes


def check(args: argparse.Namespace) -> None:
    from ..engine.cli import check_weights
    from ..errors import InvalidInput

    check_weights(args)
    for name in ("frames", "cpu_frames", "bake_frames", "threads"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.capture_tracks is not None and not args.capture_tracks.is_file():
        raise InvalidInput(f"--capture-tracks: no such file {args.capture_tracks}")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..engine.bench import BenchConfig, bench_cold_start, bench_complete_head, bench_device, bench_prestarted, table
    from ..engine.session import Session

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes
    cpu_sizes = args.cpu_sizes or sizes
    devices = [] if args.gpu_only else ["cpu"]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append("cuda")
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    trained = None
    for dev in devices:
        if not args.no_cold:
            log(f"cold start on {dev}")
            rows.append(bench_cold_start(dev, args.weights))
            rows.append(bench_prestarted(dev, args.weights))
        session = Session(weights_dir=args.weights, device=dev)
        trained = session.loaded.trained
        cfg = BenchConfig(sizes=cpu_sizes if dev == "cpu" else sizes, fit=not args.no_fit,
                          frames=args.cpu_frames if dev == "cpu" else args.frames, bake_frames=args.bake_frames,
                          capture_tracks=args.capture_tracks,
                          dense_max_points=args.dense_max_points or (3_000_000 if dev == "cuda" else 300_000))
        rows += bench_device(session, cfg, log)
        log(f"rows so far (a run cut short keeps them):\n{table(rows)}")
        if not args.no_head:
            del session  # the Blender run starts its own backend
            rows.append(bench_complete_head(dev, 128 if dev == "cpu" else 256, log, args.weights))
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else "none"
    print(f"imhead bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
          f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; GPU: {gpu}; "
          f"weights: {'trained' if trained else 'untrained (geometric init)'}")
    print(table(rows))
    return 0
