"""`imhead device [--device auto|cpu|cuda]`: the torch build in this Python, whether it sees a CUDA GPU, and
the device a command (or the add-on's backend) given that --device would run the model on."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.cli import DEVICES

    parser.add_argument("--device", choices=DEVICES, default="auto", help="the --device setting to resolve")


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    print(f"python: {sys.executable}")
    print(f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'no, CPU only'})")
    if cuda:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA available: yes ({names})")
    else:
        print("CUDA available: no")
    if args.device == "cuda" and not cuda:
        print("device: none: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 1
    print(f"device: {'cuda' if args.device == 'cuda' or (args.device == 'auto' and cuda) else 'cpu'}")
    return 0
