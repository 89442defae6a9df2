"""cProfile of the engine's user-facing ops on one device, for finding where a bench row's time goes:

    python tools/profile_session.py --device cuda --resolution 256 --ops generate fit deform --top 25 --out DIR

Each op runs once to warm up, then once under cProfile (CUDA synchronised after the op); writes
DIR/<op>.txt with the functions sorted by cumulative time, and prints the op's wall time."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from backend.engine.head import HeadSpec
from backend.engine.session import Session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--ops", nargs="+", default=["generate", "fit", "deform"], choices=["generate", "fit", "deform"])
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(device=args.device)
    head = HeadSpec(s.sample_identity(0))
    a = s.atlas
    pts = (a.vertices.astype(np.float64) * 100 + 3.0).astype(np.float32)
    canonical = s.generate({"head": head.to_dict(), "resolution": args.resolution}, {})[1]["vertices"]
    expr = np.zeros((4, 53), np.float32)
    expr[:, :10] = np.random.default_rng(0).uniform(0, 1, (4, 10))
    ops = {
        "generate": lambda: s.generate({"head": head.to_dict(), "resolution": args.resolution}, {}),
        "fit": lambda: s.fit({"resolution": 128, "seed": 0}, {"points": pts, "faces": a.faces}),
        "deform": lambda: s.deform({"head": head.to_dict()}, {"canonical": canonical, "expressions": expr}),
    }
    for name in args.ops:
        ops[name]()
        s.template_index.forget()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        ops[name]()
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        wall = time.perf_counter() - t
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.top)
        (args.out / f"{name}.txt").write_text(f"{name}: {wall:.3f} s\n{text.getvalue()}")
        print(f"{name}: {wall:.3f} s", flush=True)


if __name__ == "__main__":
    main()
