"""`python -m backend swap a.json b.json --regions "nose tip,chin" -o out.json [--blend T] [--mesh out.ply]`:
give head A the region codes of head B (or blend them with weight T) and write the new HeadSpec."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import add_session_arguments

    parser.add_argument("head_a", type=Path, help="head that receives the regions")
    parser.add_argument("head_b", type=Path, help="head that gives them")
    parser.add_argument("--regions", required=True, help='comma-separated region names, or "all"')
    parser.add_argument("-o", "--output", type=Path, required=True, help="output HeadSpec JSON")
    parser.add_argument("--blend", type=float, default=None, help="blend weight toward B in [0,1] (default: swap)")
    parser.add_argument("--mesh", type=Path, default=None, help="also write the new head's mesh (PLY)")
    parser.add_argument("--resolution", type=int, default=256)
    add_session_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..engine.cli import PrintProgress, make_session, save_mesh
    from ..engine.edit import apply_ops
    from ..engine.head import load_head

    session = make_session(args)
    names, exprs = session.region_names, session.expression_names
    a, b = load_head(args.head_a, names, exprs), load_head(args.head_b, names, exprs)
    regions = "all" if args.regions.strip() == "all" else [r.strip() for r in args.regions.split(",") if r.strip()]
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
