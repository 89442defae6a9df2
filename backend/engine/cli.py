"""Helpers shared by the engine's CLI commands (generate, fit, swap, animate, bench): common options, the
argument checks every command runs before any work (backend/__main__.py calls each command's `check`), progress
on stderr and mesh output by extension."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import InvalidInput
from .meshio import MESH_FORMATS, write_mesh

ATTRIBUTES = ("canonical", "template", "region", "normals", "uv")
DEVICES = ("auto", "cpu", "cuda")
HEAD_JSON = "expected head JSON written by `imhead generate --head`"
MESH_HELP = "format from the extension: .ply (with attribute columns), .obj or .glb"


def resolution(text: str) -> int:
    """argparse type: an extraction resolution within what the engine accepts."""
    from ..payloads import check_resolution

    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"resolution must be an integer, got {text!r}") from exc
    try:
        return check_resolution(value)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder with imhead.safetensors and atlas.safetensors (default: the repository's "
                             "weights/)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="torch device; auto takes cuda when torch sees a GPU")


def weights_dir(args: argparse.Namespace) -> Path:
    from ..weights import default_weights_dir

    return args.weights if args.weights is not None else default_weights_dir()


def check_weights(args: argparse.Namespace) -> None:
    """--weights names a folder holding the weights file (and the default folder holds one)."""
    from ..weights import WEIGHTS_FILE

    folder = weights_dir(args)
    given = "--weights " if args.weights is not None else "the default weights folder "
    if not folder.is_dir():
        raise InvalidInput(f"{given}{folder}: no such directory")
    if not (folder / WEIGHTS_FILE).is_file():
        raise InvalidInput(f"{given}{folder}: no {WEIGHTS_FILE} in it")


def load_names(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Region and expression names from the weights folder's atlas (the session's lists; no torch)."""
    from ..data.atlas import load_atlas

    atlas = load_atlas(weights_dir(args) / "atlas.safetensors")
    return list(atlas.names), list(atlas.expressions)


def check_input(path: Path, what: str) -> None:
    if not path.exists():
        raise InvalidInput(f"{what} {path}: no such file")
    if not path.is_file():
        raise InvalidInput(f"{what} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"{what} {path}: not readable")


def check_output(path: Path, what: str, formats: tuple[str, ...] | None = None) -> None:
    """The file can be written (its folder exists and is writable) and, with `formats`, has one of those
    extensions."""
    if formats is not None and path.suffix.lower() not in formats:
        raise InvalidInput(f"{what} {path}: cannot write {path.suffix or 'a file without an extension'}; "
                           f"the format comes from the extension: {', '.join(formats)}")
    if path.is_dir():
        raise InvalidInput(f"{what} {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise InvalidInput(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidInput(f"{what} {path}: not writable")


def check_mesh_output(path: Path, what: str) -> None:
    check_output(path, what, MESH_FORMATS)


def check_output_dir(path: Path, what: str) -> None:
    """A folder that exists and is writable, or one that can be made (its nearest existing parent is writable)."""
    if path.exists():
        if not path.is_dir():
            raise InvalidInput(f"{what} {path}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidInput(f"{what} {path}: not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInput(f"{what} {path}: cannot be created in {parent}")


def read_json(path: Path, what: str) -> object:
    check_input(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc}") from exc


def check_head_json(path: Path, names: tuple[list[str], list[str]], what: str = "head") -> dict:
    """A HeadSpec file (backend/engine/head.py), fully validated against the model's names; a mesh or other
    file is refused with a message saying what was expected."""
    from .head import FORMAT, HeadSpec

    check_input(path, what)
    data = path.read_bytes()
    try:
        head = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        kind = "a PLY mesh" if data.startswith(b"ply") else "a glTF binary" if data.startswith(b"glTF") else \
            "an OBJ mesh" if path.suffix.lower() == ".obj" else "not a head"
        raise InvalidInput(f"{what} {path} is {kind}: {HEAD_JSON}")
    try:
        HeadSpec.from_dict(head, *names)
    except InvalidInput as exc:
        raise InvalidInput(f"{what} {path}: {exc}") from exc
    return head


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
    """The mesh in the format of the path's extension (MESH_FORMATS): binary PLY with the attribute columns
    (canonical, template, region, normals, uv), OBJ or glTF binary with normals and uv."""
    write_mesh(path, arrays["vertices"], arrays["faces"], {k: arrays[k] for k in ATTRIBUTES if k in arrays})
