"""Render the neutral mouth of opened heads as the opener used to show it and as it is shown now (Blender,
Cycles on CPU).

    .venv/bin/python tools/render_rest_mouth.py --out docs/pictures [--heads 6@96 0@128] [--samples 16]

Writes rest_mouth.png: per head (a row), the mesh at its canonical positions (where the deform op solves from:
the slit's copies apart on their own sides, as generate showed them before rest positions) and at its rest
positions (`vertices`, what generate returns and the add-on shows at neutral). A docs tool: not shipped, not a
test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render_docs import Panel, Picture, log, render, to_blender  # noqa: E402

from backend.engine.session import Session  # noqa: E402

MOUTH_CENTRE = np.array([0.0, -0.03, 0.10])  # backend axes, m
CLOSEUP_RADIUS = 0.032
COLUMN = 0.075  # m between the two panels of a row
ROW = 0.085  # m between rows


def head_spec(text: str) -> tuple[int, int]:
    seed, _, res = text.partition("@")
    return int(seed), int(res)


def panels(s: Session, seed: int, res: int, row: int) -> tuple[list[Panel], str]:
    """The two close-ups of one head and a line saying how far the rest positions are from the solve ones."""
    _, arrays = s.generate({"seed": seed, "resolution": res}, {})
    canonical, rest = arrays["canonical"].astype(np.float64), arrays["vertices"].astype(np.float64)
    near = np.linalg.norm(canonical - MOUTH_CENTRE, axis=1) < CLOSEUP_RADIUS
    faces = arrays["faces"][near[arrays["faces"]].all(1)]
    offset = np.linalg.norm(rest - canonical, axis=1)
    line = (f"seed {seed} at {res}: {int((offset > 0).sum())} vertices with a rest offset, largest "
            f"{offset.max() * 1e3:.2f} mm")
    return [Panel(front(canonical, -0.5 * COLUMN, row), faces, f"seed {seed}@{res}: canonical (before)", row=row),
            Panel(front(rest, 0.5 * COLUMN, row), faces, f"seed {seed}@{res}: rest (now)", row=row)], line


def front(v: np.ndarray, x: float, row: int) -> np.ndarray:
    """The mouth seen from the front (the camera's slight tilt only), placed at (x, row)."""
    return to_blender(v - MOUTH_CENTRE) + np.array([x, 0.0, -row * ROW])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--heads", type=head_spec, nargs="+", default=[(6, 96), (0, 128)], help="SEED@RESOLUTION")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--weights", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = Session(args.weights, device="cpu")
    shown, lines = [], []
    for row, (seed, res) in enumerate(args.heads):
        more, line = panels(s, seed, res, row)
        shown += more
        lines.append(line)
        log(t0, line)
    render(Picture(shown, "the neutral mouth: solve positions against rest positions", 9000.0, extra=lines),
           args.out / "rest_mouth.png", args.samples)
    log(t0, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
