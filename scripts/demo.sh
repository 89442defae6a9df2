#!/usr/bin/env bash
# The README's main command: set up, build the extension zip, install it into a headless Blender (the
# PyPI bpy module) with an isolated user config, press Generate, save out/demo.blend, render out/demo.png.
# Extra arguments go to scripts/demo.py (e.g. --seed 7 --resolution 192).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python build.py
.venv/bin/python scripts/demo.py "$@"
