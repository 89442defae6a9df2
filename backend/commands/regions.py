"""`imhead regions [--json] [--atlas PATH]`: the 39-region atlas (id, name, mirror, anchor in
metres on the mean head). Reads weights/atlas.safetensors by default."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of {id, name, mirror, anchor}")
    parser.add_argument("--atlas", type=Path, default=None,
                        help="atlas file (default: the repository's weights/atlas.safetensors)")


def check(args: argparse.Namespace) -> None:
    from ..engine.cli import check_input

    if args.atlas is not None:
        check_input(args.atlas, "--atlas")


def run(args: argparse.Namespace) -> int:
    from ..data.atlas import load_atlas

    atlas = load_atlas(args.atlas)
    rows = atlas.regions_json()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'id':>3}  {'name':<22} {'mirror':<22} {'anchor x, y, z (m)':>26}")
    for r in rows:
        mirror = rows[r["mirror"]]["name"] if r["mirror"] is not None else "-"
        x, y, z = r["anchor"]
        print(f"{r['id']:>3}  {r['name']:<22} {mirror:<22} {x:8.4f} {y:8.4f} {z:8.4f}")
    return 0
