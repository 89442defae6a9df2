"""`imhead swap a.json b.json --regions "nose tip,chin" -o out.json [--blend T] [--mesh out.ply]`:
give head A the region codes of head B (or blend them with weight T) and write the new HeadSpec."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import MESH_HELP, add_session_arguments, resolution

    parser.add_argument("head_a", type=Path, help="head JSON that receives the regions")
    parser.add_argument("head_b", type=Path, help="head JSON that gives them")
    parser.add_argument("--regions", required=True, help='comma-separated region names, or "all"')
    parser.add_argument("-o", "--output", type=Path, required=True, help="output HeadSpec JSON")
    parser.add_argument("--blend", type=float, default=None, help="blend weight toward B in [0,1] (default: swap)")
    parser.add_argument("--mesh", type=Path, default=None,
                        help=f"also write the new head's mesh (default: not written); {MESH_HELP}")
    parser.add_argument("--resolution", type=resolution, default=256, help="resolution of --mesh")
    add_session_arguments(parser)


def parse_regions(text: str) -> str | list[str]:
    return "all" if text.strip() == "all" else [r.strip() for r in text.split(",") if r.strip()]


def check(args: argparse.Namespace) -> None:
    from ..engine import cli
    from ..engine.head import check_names
    from ..errors import InvalidInput

    cli.check_weights(args)
    names = cli.load_names(args)
    cli.check_head_json(args.head_a, names, "head_a")
    cli.check_head_json(args.head_b, names, "head_b")
    regions = parse_regions(args.regions)
    if not regions:
        raise InvalidInput("--regions names no region")
    if regions != "all":
        check_names(regions, names[0], "region names")
    if args.blend is not None and not 0.0 <= args.blend <= 1.0:
        raise InvalidInput(f"--blend must lie in [0, 1], got {args.blend}")
    cli.check_output(args.output, "-o")
    if args.mesh is not None:
        cli.check_mesh_output(args.mesh, "--mesh")


def run(args: argparse.Namespace) -> int:
    from ..engine.cli import PrintProgress, make_session, save_mesh
    from ..engine.edit import apply_ops
    from ..engine.head import load_head

    session = make_session(args)
    names, exprs = session.region_names, session.expression_names
    a, b = load_head(args.head_a, names, exprs), load_head(args.head_b, names, exprs)
    regions = parse_regions(args.regions)
    op = {"op": "swap", "regions": regions, "other": b.to_dict()}
    if args.blend is not None:
        op = {"op": "blend", "regions": regions, "other": b.to_dict(), "t": args.blend}
    new = apply_ops(a, [op], session.decode_regions, names, session.region_stats, session.parse_head)
    args.output.write_text(json.dumps(new.to_dict(), indent=1) + "\n")
    print(f"wrote {args.output}: {len(new.region_overrides)} region overrides")
    if args.mesh is not None:
        _, arrays = session.generate({"head": new.to_dict(), "resolution": args.resolution}, {}, PrintProgress())
        save_mesh(args.mesh, arrays)
        print(f"wrote {args.mesh}: {len(arrays['vertices'])} vertices")
    return 0
