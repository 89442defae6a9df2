"""`python -m backend <command>`: each command lives in backend/commands/<name>.py and is imported only
when chosen, so `serve` starts without loading what it does not need."""

import argparse
import importlib
import os
import sys

from . import cpu
from .errors import BackendError

COMMANDS = {
    "serve": "run the stdio server the Blender add-on talks to",
    "regions": "print the 39-region atlas",
    "generate": "generate a head mesh (PLY with attribute columns)",
    "fit": "fit the model to a mesh or point cloud",
    "swap": "swap region codes between two heads",
    "animate": "deform a head's mesh through expression frames",
    "bench": "print the speed and memory benchmark table",
    "eval": "evaluate the shipped weights on the held-out split",
}


# CUDA's caching allocator with expandable segments (before torch initialises CUDA; a user's own setting wins):
# steadier extraction times (docs/benchmarks.md, "Engine tuning"). Linux only: elsewhere torch warns that it
# lacks them.
if sys.platform.startswith("linux"):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv: list[str] | None = None) -> int:
    cpu.mark_start()  # commands that load torch size its thread pool by the CPU left free meanwhile (cpu.py)
    parser = argparse.ArgumentParser(prog="python -m backend")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(f".commands.{name}", __package__)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    status = main()
    if sys.getprofile() is None and sys.gettrace() is None:  # not under cProfile / coverage / a debugger
        # Every output file is closed and the streams are flushed: skip the interpreter's teardown, which
        # frees torch's ~1,500 modules one by one (0.4-0.5 s measured after `import torch` on 2 cores).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`... | head`): nothing more can be written anyway
                pass
        os._exit(status)
    sys.exit(status)
