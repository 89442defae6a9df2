"""`imhead fit-image PHOTO_OR_VIDEO --head head.json --frames frames.json [-o head.ply]`: fit one
identity, per-frame expressions and head pose to a photo or a short video (backend/capture, docs/capture.md).
The head JSON is a HeadSpec (neutral); the frames JSON holds the camera and, per frame, the expression
weights by name, the head's rotation (3x3, model -> camera) and translation (m), and the landmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import MESH_HELP, add_session_arguments, resolution

    parser.add_argument("footage", type=Path, help="a photo (.png, .jpg, ...) or a video (.mp4, .mov, ...)")
    parser.add_argument("--head", type=Path, required=True, help="write the fitted HeadSpec JSON here")
    parser.add_argument("--frames", type=Path, required=True, help="write the per-frame expression/pose JSON here")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"also write the neutral head mesh (default: not written); {MESH_HELP}")
    parser.add_argument("--resolution", type=resolution, default=128, help="resolution of the head mesh")
    parser.add_argument("--steps", type=int, default=None,
                        help="network-stage optimisation steps (default: the capture fit's own)")
    parser.add_argument("--no-silhouette", action="store_true", help="landmarks only")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the fit")
    add_session_arguments(parser)


def check(args: argparse.Namespace) -> None:
    from ..capture.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES
    from ..engine import cli
    from ..errors import InvalidInput

    cli.check_weights(args)
    cli.check_input(args.footage, "footage")
    if args.footage.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        raise InvalidInput(f"footage {args.footage}: unsupported file type {args.footage.suffix or '(none)'}; "
                           f"images: {', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))}")
    cli.check_output(args.head, "--head")
    cli.check_output(args.frames, "--frames")
    if args.output is not None:
        cli.check_mesh_output(args.output, "-o")
    if args.steps is not None and args.steps < 1:
        raise InvalidInput(f"--steps must be at least 1, got {args.steps}")


def frames_json(out: dict, arrays: dict[str, np.ndarray], expression_names: list[str]) -> dict:
    cap = out["capture"]
    frames = []
    for t in range(cap["frames"]):
        frames.append({
            "expression": {n: round(float(w), 5) for n, w in zip(expression_names, arrays["expressions"][t]) if w > 0},
            "rotation": arrays["rotations"][t].round(6).tolist(),
            "translation": arrays["translations"][t].round(6).tolist(),
            "face_found": bool(arrays["found"][t]),
            "landmarks_px": arrays["landmarks"][t].round(2).tolist(),
            "fitted_landmarks_px": arrays["fitted_landmarks"][t].round(2).tolist(),
        })
    camera = {"width": cap["width"], "height": cap["height"], "focal_px": cap["focal_px"], "fps": cap["fps"],
              "convention": "x_camera = rotation @ x_model + translation; camera looks down -Z, +Y up"}
    return {"format": "imhead-capture/1", "camera": camera, "fit": {k: v for k, v in cap.items() if k not in camera},
            "frames": frames}


def run(args: argparse.Namespace) -> int:
    from ..capture.op import run as fit_capture
    from ..engine.cli import PrintProgress, make_session, save_mesh

    session = make_session(args)
    params: dict = {"path": str(args.footage), "resolution": args.resolution, "seed": args.seed,
                    "silhouette": not args.no_silhouette}
    if args.steps is not None:
        params["steps"] = args.steps
    out, arrays = fit_capture(session, params, PrintProgress())
    args.head.write_text(json.dumps(out["head"], indent=1) + "\n")
    args.frames.write_text(json.dumps(frames_json(out, arrays, session.expression_names)) + "\n")
    if args.output is not None:
        save_mesh(args.output, arrays)
    cap = out["capture"]
    print(f"{cap['frames']} frame(s), face in {cap['faces_found']}; landmark error {cap['landmark_error_px']:.2f} px; "
          f"focal {cap['focal_px']:.0f} px; fit {cap['fit_seconds']:.1f} s")
    return 0
