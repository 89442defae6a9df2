"""`imhead animate head.json frames.json -o outdir [--resolution R]`: extract the head's canonical
mesh once, deform it through every frame (root finding through the backward warp, one fixed topology) and
write outdir/frame_0000.ply, ... (binary PLY; vertex i is the same point in every frame, with `canonical`,
`residual` (|posed-space SDF| at the vertex, m) and `converged` columns).

frames.json: a JSON list with one object per frame mapping ICT expression names to weights,
e.g. [{"jawOpen": 0.0}, {"jawOpen": 0.5, "mouthSmile_L": 0.3}]; names not given are 0."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import add_session_arguments, resolution

    parser.add_argument("head", type=Path, help="HeadSpec JSON (imhead generate --head)")
    parser.add_argument("frames", type=Path, help="JSON list of {expression name: weight} per frame")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output folder for frame_0000.ply, ... (made if missing)")
    parser.add_argument("--resolution", type=resolution, default=256, help="resolution of the canonical mesh")
    add_session_arguments(parser)


def check(args: argparse.Namespace) -> None:
    from ..engine import cli

    cli.check_weights(args)
    names = cli.load_names(args)
    cli.check_head_json(args.head, names, "head")
    cli.check_input(args.frames, "frames")
    read_frames(args.frames, names[1])
    cli.check_output_dir(args.output, "-o")


def read_frames(path: Path, names: list[str]) -> np.ndarray:
    from ..engine.head import _expression_weight, check_names
    from ..errors import InvalidInput

    try:
        frames = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    if not isinstance(frames, list) or not frames or not all(isinstance(f, dict) for f in frames):
        raise InvalidInput(f"{path}: expected a non-empty JSON list of objects")
    out = np.zeros((len(frames), len(names)), np.float32)
    for t, frame in enumerate(frames):
        check_names(list(frame), names, "expression names")
        for name, w in frame.items():
            out[t, names.index(name)] = _expression_weight(w, f"{path}: frame {t}: weight of {name!r}")
    return out


def run(args: argparse.Namespace) -> int:
    from ..engine.cli import PrintProgress, make_session
    from ..engine.head import load_head
    from ..engine.meshio import write_ply

    session = make_session(args)
    head = load_head(args.head, session.region_names, session.expression_names)
    expressions = read_frames(args.frames, session.expression_names)
    neutral = session.parse_head(head.to_dict() | {"expression": {}})
    _, mesh = session.generate({"head": neutral.to_dict(), "resolution": args.resolution}, {}, PrintProgress())
    out, res = session.deform({"head": neutral.to_dict()}, {"canonical": mesh["canonical"], "expressions": expressions},
                              PrintProgress())
    args.output.mkdir(parents=True, exist_ok=True)
    for t in range(len(expressions)):
        write_ply(args.output / f"frame_{t:04d}.ply", res["vertices"][t], mesh["faces"],
                  {"canonical": mesh["canonical"], "residual": res["residual"][t], "converged": res["converged"][t]})
    print(f"wrote {len(expressions)} frames of {len(mesh['canonical'])} vertices to {args.output}; "
          f"non-converged vertex-frames: {out['non_converged']}, residual p99 {out['residual_p99_m'] * 1e3:.4f} mm")
    return 0
