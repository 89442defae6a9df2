"""Build the Blender extension zip: `python build.py [--out DIR] [--python PATH]` -> DIR/imhead-<version>.zip.

Zip layout (what Blender's "Install from Disk" expects, and what `blender_ext.py validate` checks):
    blender_manifest.toml, the add-on package files (imhead_blender/*) at the root,
    backend/   the runtime backend (no backend/train/, no tests/ folders, no bytecode),
    weights/   only the shipped files (*.safetensors, *.sha256, MODEL_CARD.md, identity_directions.json),
    build_info.json   the Python with torch recorded at build time (the add-on's default interpreter).
Standard library only; entries are sorted and time-stamped 1980-01-01 so the same tree gives the same zip.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
MANIFEST = "blender_manifest.toml"
ADDON_DIR = "imhead_blender"
# Left out by folder, never by file name: a runtime module may be named like a test.
EXCLUDED_DIRS = {"__pycache__", "tests", "train", ".pytest_cache"}
EXCLUDED_FILES = ("*.pyc", "*.pyo", ".*", "build_info.json")
WEIGHT_FILES = ("*.safetensors", "*.sha256", "MODEL_CARD.md", "identity_directions.json")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    pass


def default_python() -> Path:
    venv = REPO / ".venv"
    return venv / "Scripts" / "python.exe" if sys.platform == "win32" else venv / "bin" / "python"


def read_version() -> str:
    """The manifest's version; the backend and pyproject.toml must agree with it."""
    manifest = tomllib.loads((REPO / MANIFEST).read_text(encoding="utf-8"))
    version = manifest.get("version")
    backend = re.search(r'^__version__\s*=\s*"([^"]+)"', (REPO / "backend" / "__init__.py").read_text(), re.M)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    found = {MANIFEST: version, "backend/__init__.py": backend and backend.group(1), "pyproject.toml": project}
    if len(set(found.values())) != 1 or not version:
        raise BuildError("versions disagree: " + ", ".join(f"{k} = {v!r}" for k, v in found.items()))
    return version


def runtime_files(root: Path) -> list[Path]:
    """Files under `root` that ship: none in cache, test or training folders, no bytecode or hidden files."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.is_file() and not any(fnmatch.fnmatch(path.name, pat) for pat in EXCLUDED_FILES):
            out.append(path)
    return out


def weight_files() -> list[Path]:
    folder = REPO / "weights"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat)
                                                                    for pat in WEIGHT_FILES))


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def build(out_dir: Path, python: Path | None) -> Path:
    version = read_version()
    if (REPO / ADDON_DIR / "backend").exists():
        raise BuildError(f"{ADDON_DIR}/backend exists in the source tree; it would clash with the bundled backend/")
    entries: dict[str, bytes] = {MANIFEST: (REPO / MANIFEST).read_bytes()}
    for path in runtime_files(REPO / ADDON_DIR):
        entries[path.relative_to(REPO / ADDON_DIR).as_posix()] = path.read_bytes()
    for path in runtime_files(REPO / "backend"):
        entries[path.relative_to(REPO).as_posix()] = path.read_bytes()
    for path in weight_files():
        entries[f"weights/{path.name}"] = path.read_bytes()
    info = {"version": version, "source_commit": git_commit(), "python": str(python) if python else None}
    entries["build_info.json"] = (json.dumps(info, indent=2) + "\n").encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"imhead-{version}.zip"
    tmp = target.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name in sorted(entries):
            item = zipfile.ZipInfo(name, ZIP_TIME)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(item, entries[name])
    tmp.replace(target)  # never leave a half-written zip under the final name
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder (default: dist/)")
    parser.add_argument("--python", type=Path, default=None,
                        help="Python with torch to record for the add-on (default: the repo's .venv python)")
    args = parser.parse_args(argv)
    python = args.python
    if python is None:
        python = default_python()
        if not python.exists():
            print(f"warning: {python} does not exist; the zip records no Python, so users must set one in the "
                  "add-on preferences (run scripts/setup.sh first, or pass --python)", file=sys.stderr)
            python = None
    elif not python.is_file():
        print(f"error: --python {python} is not a file", file=sys.stderr)
        return 2
    else:
        python = python.absolute()  # not resolve(): a venv's python is a symlink that must stay one
    try:
        target = build(args.out, python)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {len(names)} files, "
          f"{sum(n.startswith('weights/') for n in names)} weight files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
