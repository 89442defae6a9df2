"""`imhead surface --seeds 0-19 --resolutions 128 256 [--raw] [--json out.json]`: the surface
quality table of generated heads (docs/surface.md): vertices, genus and boundary loops of the main piece,
the second piece's share of the vertices, the neck loop's planarity and smoothness, and for jawOpen,
eyeBlink_L and eyeBlink_R at weight 1 (the deform op) the unsolved vertices, edges stretched beyond 3x
and the largest stretch. --raw also measures each head as extracted (no neck cut, slits or piece removal)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXPRESSIONS = ("jawOpen", "eyeBlink_L", "eyeBlink_R")
STRETCH_LIMIT = 3.0


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"seeds must look like 0-19 or 1,4,7, got {text!r}") from exc
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import add_session_arguments, resolution

    parser.add_argument("--seeds", type=_seeds, default=_seeds("0-19"),
                        help="identity samples, e.g. 0-19 or 1,4 (default: 0-19)")
    parser.add_argument("--resolutions", type=resolution, nargs="+", default=[128],
                        help="cells along the longest side")
    parser.add_argument("--raw", action="store_true", help="also measure the meshes as extracted")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here (default: not written)")
    add_session_arguments(parser)


def check(args: argparse.Namespace) -> None:
    from ..engine import cli

    cli.check_weights(args)
    if args.json is not None:
        cli.check_output(args.json, "--json")


def measure(session, seed: int, resolution: int) -> dict:
    """One row: generate the head, then pose its canonical mesh through EXPRESSIONS at weight 1."""
    import numpy as np

    from ..engine import surface_metrics as sm

    t0 = time.perf_counter()
    out, arrays = session.generate({"seed": seed, "resolution": resolution}, {})
    seconds = time.perf_counter() - t0
    faces, canonical = arrays["faces"], arrays["canonical"]
    topo = sm.topology(faces)
    neck = sm.neck_loop(canonical, faces)
    names = session.expression_names
    weights = np.zeros((len(EXPRESSIONS), len(names)), np.float32)
    for j, name in enumerate(EXPRESSIONS):
        weights[j, names.index(name)] = 1.0
    posed = pose(session, out["head"], canonical, weights)
    row = {"seed": seed, "resolution": resolution, "opened": session.open_surfaces, "vertices": topo.vertices,
           "genus": topo.genus, "boundary_loops": topo.boundary_loops, "pieces": len(topo.pieces),
           "second_piece_fraction": topo.second_piece_fraction, "nonmanifold_edges": topo.nonmanifold_edges,
           "neck_planarity_m": None if neck is None else neck.planarity_m,
           "neck_smoothness": None if neck is None else neck.smoothness, "generate_s": seconds,
           "handles_cut": out["stats"].get("surface", {}).get("handles_cut", 0),
           "handle_arcs_cut": out["stats"].get("surface", {}).get("handle_arcs_cut", 0),
           "holes_capped": out["stats"].get("surface", {}).get("holes_capped", 0)}
    for i, name in enumerate(EXPRESSIONS):
        stretch = sm.edge_stretch(canonical, posed["vertices"][i], faces)
        row[name] = {"unsolved": int((posed["converged"][i] == 0).sum()),
                     "stretched": int((stretch > STRETCH_LIMIT).sum()), "max_stretch": float(stretch.max())}
    return row


def pose(session, head: dict, canonical, weights) -> dict:
    """The deform op's vertices and converged flags (Session.pose, as the deform op poses them: on the CPU each
    frame on its own, the lips' and lids' vertices along the expression path) with the residual's cheap bound."""
    z_id, zr, k = session.decode_params(head)
    res = session.pose(canonical, z_id, zr, k, weights, exact_residual=False)
    return {"vertices": res["vertices"], "converged": res["converged"]}


def format_row(r: dict) -> str:
    neck = "      -       - " if r["neck_planarity_m"] is None else \
        f"{r['neck_planarity_m'] * 1000:7.4f} {r['neck_smoothness']:7.3f}"
    expr = "  ".join(f"{r[e]['unsolved']:4d} {r[e]['stretched']:4d} {r[e]['max_stretch']:6.1f}" for e in EXPRESSIONS)
    return (f"{r['seed']:4d} {r['resolution']:4d} {'open' if r['opened'] else 'raw ':4s} {r['vertices']:7d} "
            f"{r['genus']:5.1f} {r['boundary_loops']:5d} {r['pieces']:4d} {r['second_piece_fraction'] * 100:6.2f} "
            f"{neck}  {expr}")


HEADER = ("seed  res mesh   verts genus loops pcs 2nd%   neck_mm  smooth  "
          + "  ".join(f"{e[:10]:>10s}:uns >3x    max" for e in EXPRESSIONS))


def run(args: argparse.Namespace) -> int:
    from ..cpu import limit_torch_threads
    from ..engine.cli import make_session

    limit_torch_threads()
    session = make_session(args)
    rows = []
    print(HEADER, flush=True)
    for resolution in args.resolutions:
        for seed in args.seeds:
            for opened in ([False, True] if args.raw else [True]):
                session.open_surfaces = opened
                rows.append(measure(session, seed, resolution))
                print(format_row(rows[-1]), flush=True)
    opened_rows = [r for r in rows if r["opened"]]
    if opened_rows:
        ok = sum(r["genus"] == 0 and r["second_piece_fraction"] <= 0.005
                 and all(r[e]["unsolved"] == 0 and r[e]["stretched"] == 0 for e in EXPRESSIONS)
                 for r in opened_rows)
        print(f"opened heads meeting every target (genus 0, second piece <= 0.5%, no unsolved vertex, no edge "
              f"> {STRETCH_LIMIT:g}x): {ok} of {len(opened_rows)}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
