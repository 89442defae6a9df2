"""`imhead <command>` (the console script pyproject.toml installs) or `python -m backend <command>`: each
command lives in backend/commands/<name>.py and is imported only when chosen, so `serve` starts without
loading what it does not need. A command module has `add_arguments(parser)`, `run(args)` and optionally
`check(args)`, which checks every argument (paths, formats, input files, names) before `run` does any work."""

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

from . import cpu
from .errors import BackendError

COMMANDS = {
    "serve": "run the stdio server the Blender add-on talks to",
    "regions": "print the 39-region atlas",
    "generate": "generate a head mesh (.ply with attribute columns, .obj or .glb)",
    "fit": "fit the model to a mesh or point cloud",
    "fit-image": "fit a head, its expressions and pose to a photo or a video",
    "swap": "swap region codes between two heads",
    "animate": "deform a head's mesh through expression frames",
    "bench": "print the speed and memory benchmark table",
    "eval": "evaluate the shipped weights on the held-out split",
    "surface": "print the surface quality table of generated heads (topology, neck cut, expression stretch)",
    "device": "print the torch build and the device the model would run on",
}


# CUDA's caching allocator with expandable segments (before torch initialises CUDA; a user's own setting wins):
# steadier extraction times (docs/benchmarks.md, "Engine tuning"). Linux only: elsewhere torch warns that it
# lacks them.
if sys.platform.startswith("linux"):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


EXIT_ENVIRONMENT = 5  # a dependency (numpy) is missing: no frame can be spoken


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the text already says it (or it is a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def program_name() -> str:
    return "imhead" if Path(sys.argv[0]).name == "imhead" else "python -m backend"


def build_parser(load: Iterable[str] = (),
                 prog: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser with the subcommands of `load` fully defined (their modules imported); the others only named.
    Returns it and the imported modules by command name."""
    parser = argparse.ArgumentParser(prog=prog or program_name(), formatter_class=HelpFormatter,
                                     description="imhead: implicit morphable heads (the Blender add-on's backend)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name in load:
            modules[name] = importlib.import_module(f".commands.{name.replace('-', '_')}", __package__)
            modules[name].add_arguments(p)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    cpu.mark_start()  # commands that load torch size its thread pool by the CPU left free meanwhile (cpu.py)
    argv = sys.argv[1:] if argv is None else argv
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else []
    try:
        parser, modules = build_parser(chosen)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "backend":
            raise
        # one line the add-on shows as the reason (imhead_blender/client.py, ERROR_PREFIX)
        print(f"[imhead-backend] error: the Python running the backend ({sys.executable}) cannot import "
              f"{exc.name}. Choose a Python with imhead's dependencies (scripts/setup.sh makes one) in the "
              "add-on preferences", file=sys.stderr)
        return EXIT_ENVIRONMENT
    args = parser.parse_args(argv)
    module = modules[args.command]
    try:
        if hasattr(module, "check"):
            module.check(args)  # every argument, before any work
        return int(module.run(args) or 0)
    except BackendError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The console script and `python -m backend`: run, then leave without the interpreter's teardown."""
    status = main()
    if sys.getprofile() is None and sys.gettrace() is None:  # not under cProfile / coverage / a debugger
        # Every output file is closed and the streams are flushed: skip the interpreter's teardown, which
        # frees torch's ~1,500 modules one by one (docs/benchmarks.md, "Process exit").
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`... | head`): nothing more can be written anyway
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
