"""Helpers shared by the engine's CLI commands (generate, fit, swap, animate, bench)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .meshio import write_ply

ATTRIBUTES = ("canonical", "template", "region", "normals", "uv")


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder with imhead.safetensors and atlas.safetensors (default: weights/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="torch device")


def make_session(args: argparse.Namespace):
    from .session import Session

    return Session(weights_dir=args.weights, device=args.device)


class PrintProgress:
    """Progress on stderr, one line per message change; Ctrl-C is the only cancel on the command line."""

    cancelled = False

    def __init__(self) -> None:
        self.last = ""

    def report(self, fraction: float, message: str) -> None:
        if message != self.last:
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr)
            self.last = message


def save_mesh(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Binary PLY with the mesh attribute columns (canonical, template, region, normals, uv)."""
    write_ply(path, arrays["vertices"], arrays["faces"], {k: arrays[k] for k in ATTRIBUTES if k in arrays})
