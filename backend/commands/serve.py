"""`python -m backend serve`: the stdio server the Blender add-on spawns (docs/protocol.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import BackendError
from ..memory import MemoryGuard
from ..server import SESSION_OPS, Server, take_stdout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder with imhead.safetensors (default: the engine's default weights folder)")
    parser.add_argument("--device", choices=DEVICES, default=_default_device(),
                        help=f"torch device for the model (default: ${DEVICE_ENV} if set, else auto: cuda when "
                        "available)")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="developer flag: without a weights file, serve the untrained network (a sphere) "
                             "instead of refusing to start")


DEVICES = ("auto", "cpu", "cuda")
DEVICE_ENV = "IMHEAD_DEVICE"  # how the add-on passes its Automatic / CPU / GPU preference


def _default_device() -> str:
    return os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"  # checked in run()


def run(args: argparse.Namespace) -> int:
    if args.device not in DEVICES:
        print(f"[imhead-backend] ${DEVICE_ENV} must be one of {', '.join(DEVICES)}, not {args.device!r}",
              file=sys.stderr)
        return 2
    frames = take_stdout()

    def make_session():
        try:
            from ..engine.session import Session  # imported on the first handshake: torch loads only then
        except ImportError as exc:
            if (exc.name or "").split(".")[0] == "backend":
                raise
            raise BackendError(f"the Python running the backend ({sys.executable}) cannot import {exc.name}: "
                               f"{exc}. Choose a Python with imhead's dependencies (scripts/setup.sh makes one) "
                               "in the add-on preferences", code="environment_error") from exc
        from ..cpu import limit_torch_threads

        limit_torch_threads()
        return Session(weights_dir=args.weights, device=args.device, allow_untrained=args.allow_untrained)

    server = Server(make_session, SESSION_OPS, sys.stdin.buffer, frames, guard=MemoryGuard())
    return server.serve()
