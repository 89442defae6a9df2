"""`python -m backend <command>`: each command lives in backend/commands/<name>.py and is imported only
when chosen, so `serve` starts without loading what it does not need."""

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
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
    sys.exit(main())
