"""`imhead fit scan.obj -o fitted.ply --head fitted.json [--units auto|m|cm|mm|in]`: fit the model to a mesh
or point cloud (OBJ or PLY, any frame and units). The fitted head mesh is written in the input's own frame and
units (it overlays the scan), as .ply, .obj or .glb by the extension; the fit error (trimmed one-sided Chamfer
distance) is printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import MESH_HELP, add_session_arguments, resolution

    parser.add_argument("scan", type=Path, help="input mesh or point cloud (.obj or .ply)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help=f"fitted mesh in the input's frame and units; {MESH_HELP}")
    parser.add_argument("--head", type=Path, default=None,
                        help="write the fitted HeadSpec JSON here (default: not written)")
    parser.add_argument("--units", choices=("auto", "m", "cm", "mm", "in"), default="auto",
                        help="input units; auto estimates the scale")
    parser.add_argument("--resolution", type=resolution, default=128, help="resolution of the fitted mesh")
    parser.add_argument("--steps", type=int, default=None, help="latent optimisation steps (default: per device)")
    parser.add_argument("--no-expression", action="store_true", help="fit the identity only (neutral)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the fit")
    add_session_arguments(parser)


def check(args: argparse.Namespace) -> None:
    from ..engine import cli
    from ..errors import InvalidInput

    cli.check_weights(args)
    cli.check_input(args.scan, "scan")
    if args.scan.suffix.lower() not in (".obj", ".ply"):
        raise InvalidInput(f"scan {args.scan}: expected a mesh or point cloud (.obj or .ply)")
    cli.check_mesh_output(args.output, "-o")
    if args.head is not None:
        cli.check_output(args.head, "--head")
    if args.steps is not None and args.steps < 1:
        raise InvalidInput(f"--steps must be at least 1, got {args.steps}")


def run(args: argparse.Namespace) -> int:
    from ..engine.cli import PrintProgress, make_session, save_mesh
    from ..engine.meshio import read_mesh

    scan = read_mesh(args.scan)
    session = make_session(args)
    arrays = {"points": scan.vertices.astype("float32")}
    if scan.faces is not None and len(scan.faces):
        arrays["faces"] = scan.faces.astype("int32")
    if scan.normals is not None:
        arrays["normals"] = scan.normals.astype("float32")
    params: dict = {"units": args.units, "resolution": args.resolution, "fit_expression": not args.no_expression,
                    "seed": args.seed}
    if args.steps is not None:
        params["steps"] = args.steps
    out, mesh = session.fit(params, arrays, PrintProgress())
    save_mesh(args.output, mesh)
    if args.head is not None:
        args.head.write_text(json.dumps(out["head"], indent=1) + "\n")
    err = out["error"]
    print(f"fit error: {err['trimmed_one_sided_cd_mm']:.3f} mm trimmed one-sided CD (model frame; "
          f"{err['trimmed_one_sided_cd_input_units']:.4g} input units), median {err['median_mm']:.3f} mm, "
          f"p90 {err['p90_mm']:.3f} mm; scale {out['transform']['scale']:.6g} m per input unit")
    return 0
