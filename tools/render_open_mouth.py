"""Render jawOpen = 1 before and after the surface opening (engine/open_surface.py) with Blender (Cycles, CPU).

    .venv/bin/python tools/render_open_mouth.py --out docs/pictures [--seed 0] [--resolution 128] [--samples 16]
        [--weights DIR]

Writes open_mouth.png (whole heads) and open_mouth_closeup.png (the mouth). "before": the mesh as extracted,
posed by a single solve from each canonical vertex (the deform op before continuation); "after": the opened
mesh posed by the deform op (Session.pose: the lips' and lids' vertices along the expression path). A docs tool:
not shipped, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from render_docs import Panel, Picture, cut_neck, log, place, render  # noqa: E402

from backend.commands.surface import pose  # noqa: E402
from backend.engine import deform  # noqa: E402
from backend.engine import surface_metrics as sm  # noqa: E402
from backend.engine.session import Session  # noqa: E402

MOUTH_CENTRE = np.array([0.0, -0.035, 0.10])  # backend axes, m
CLOSEUP_RADIUS = 0.045


def jaw_open(s: Session, seed: int, res: int, opened: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    s.open_surfaces = opened
    out, arrays = s.generate({"seed": seed, "resolution": res}, {})
    z_id, _, _ = s.decode_params(out["head"])
    e = torch.zeros((1, len(s.expression_names)))
    e[0, s.expression_names.index("jawOpen")] = 1.0
    if opened:  # as the deform op poses it
        by_op = pose(s, out["head"], arrays["canonical"], e.numpy())
        posed, converged = by_op["vertices"][0], by_op["converged"][0].astype(bool)
    else:
        one = deform.solve_continued(lambda t: s.warp_fn(z_id, e * t), torch.as_tensor(arrays["canonical"]), 1, 1)
        posed, converged = one.vertices[0].numpy(), one.converged.numpy().reshape(-1)
    stretch = sm.edge_stretch(arrays["canonical"], posed, arrays["faces"])
    info = {"unsolved": int((~converged).sum()), "stretched": int((stretch > 3).sum()),
            "max": float(stretch.max()), "genus": sm.topology(arrays["faces"]).genus}
    faces = arrays["faces"]
    if not opened:  # the extracted neck bottom is closed and ragged: show both at the same height
        faces = cut_neck(arrays["canonical"], faces)
    return posed, faces, info | {"canonical": arrays["canonical"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--weights", type=Path, default=None, help="weights folder (default: the repository's)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = Session(weights_dir=args.weights, device="cpu")
    heads, close, lines = [], [], []
    for i, opened in enumerate((False, True)):
        posed, faces, info = jaw_open(s, args.seed, args.resolution, opened)
        label = "after (opened, continued solve)" if opened else "before (extracted, one solve)"
        lines.append(f"{label}: genus {info['genus']:g}, {info['unsolved']} unsolved, "
                     f"{info['stretched']} edges > 3x (max {info['max']:.0f}x)")
        log(t0, lines[-1])
        x = (i - 0.5) * 0.30
        heads.append(Panel(place(posed, x, 0.0), faces, "after" if opened else "before"))
        near = np.linalg.norm(info["canonical"] - MOUTH_CENTRE, axis=1) < CLOSEUP_RADIUS
        cf = faces[near[faces].all(1)]
        close.append(Panel(place(posed - MOUTH_CENTRE, (i - 0.5) * 0.11, 0.0), cf, "before" if not opened else "after"))
    render(Picture(heads, f"jawOpen = 1, seed {args.seed}, resolution {args.resolution}", 1600.0, extra=lines),
           args.out / "open_mouth.png", args.samples)
    render(Picture(close, f"jawOpen = 1, the mouth (seed {args.seed}, resolution {args.resolution})", 6000.0),
           args.out / "open_mouth_closeup.png", args.samples)
    log(t0, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
