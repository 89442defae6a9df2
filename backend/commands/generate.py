"""`imhead generate --seed N --resolution R -o head.ply [--head head.json] [--input-head in.json]`: extract a
head mesh and optionally write its HeadSpec JSON. The output format comes from the extension: .ply (binary, with
the attribute columns canonical, template, region, normals, uv), .obj or .glb (positions, normals, UVs). With
--input-head the head is read from a HeadSpec instead of sampled."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import MESH_HELP, add_session_arguments, resolution

    parser.add_argument("--seed", type=int, default=0, help="identity sample (ignored with --input-head)")
    parser.add_argument("--resolution", type=resolution, default=256,
                        help="cells along the longest box side (16..1024)")
    parser.add_argument("-o", "--output", type=Path, required=True, help=f"output mesh; {MESH_HELP}")
    parser.add_argument("--head", type=Path, default=None,
                        help="also write the head's JSON here (default: not written)")
    parser.add_argument("--input-head", type=Path, default=None,
                        help="generate this HeadSpec JSON (default: sample the identity from --seed)")
    add_session_arguments(parser)


def check(args: argparse.Namespace) -> None:
    from ..engine import cli

    cli.check_weights(args)
    cli.check_mesh_output(args.output, "-o")
    if args.head is not None:
        cli.check_output(args.head, "--head")
    if args.input_head is not None:
        cli.check_head_json(args.input_head, cli.load_names(args), "--input-head")


def run(args: argparse.Namespace) -> int:
    from ..cpu import limit_torch_threads
    from ..engine.cli import PrintProgress, make_session, read_json, save_mesh

    limit_torch_threads()  # imports torch; sized by the CPU left free while it loaded (backend/cpu.py)
    session = make_session(args)
    params: dict = {"resolution": args.resolution}
    if args.input_head is not None:
        params["head"] = session.parse_head(read_json(args.input_head, "--input-head")).to_dict()
    else:
        params["seed"] = args.seed
    out, arrays = session.generate(params, {}, PrintProgress())
    save_mesh(args.output, arrays)
    if args.head is not None:
        args.head.write_text(json.dumps(out["head"], indent=1) + "\n")
    st = out["stats"]
    print(f"wrote {args.output}: {len(arrays['vertices'])} vertices, {len(arrays['faces'])} faces "
          f"(resolution {st['resolution']}, {st['points_evaluated']} of {st['dense_points']} grid points evaluated)")
    return 0
