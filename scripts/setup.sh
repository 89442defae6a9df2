#!/usr/bin/env bash
# Create .venv in the repository root with Python 3.11, install the pinned dependencies from pyproject.toml
# (runtime + test extras + the build system) and install this checkout in editable mode, which puts the `imhead`
# command in .venv/bin and lets `.venv/bin/python -m backend` run from any directory. Idempotent: an existing
# .venv is reused and pip runs only when a requirement is missing or at the wrong version, or when the editable
# install is missing or points at another checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ]; then
    base=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate"; then
            base="$candidate"
            break
        fi
    done
    if [ -z "$base" ]; then
        echo "setup: Python 3.11 is required (neither python3.11 nor python3 is 3.11)" >&2
        exit 1
    fi
    echo "setup: creating .venv with $(command -v "$base")"
    "$base" -m venv .venv
fi
if ! is_311 .venv/bin/python; then
    echo "setup: .venv is not a working Python 3.11 environment; remove it (rm -rf .venv) and run again" >&2
    exit 1
fi

# Pinned requirements, straight from pyproject.toml (dependencies + the "test" extra + build-system.requires).
.venv/bin/python - > .venv/imhead-requirements.txt <<'PY'
import tomllib
pyproject = tomllib.load(open("pyproject.toml", "rb"))
project = pyproject["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]
                + pyproject["build-system"]["requires"]))
PY

# Which of them are not installed at a matching version? (pip vendors `packaging`; nothing else is needed.)
missing=$(.venv/bin/python - <<'PY'
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in filter(str.strip, open(".venv/imhead-requirements.txt").read().splitlines()):
    req = Requirement(line)
    try:
        ok = req.specifier.contains(md.version(req.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(line)
PY
)
if [ -n "$missing" ]; then
    echo "setup: installing $(echo "$missing" | tr '\n' ' ')"
    .venv/bin/python -m pip install -r .venv/imhead-requirements.txt
else
    echo "setup: dependencies already satisfied"
fi

# This checkout, editable (no copy: the weights/ folder next to backend/ is found as before), unless it already is.
installed=$(.venv/bin/python - <<'PY'
import importlib.metadata as md
import json
try:
    url = json.loads(md.distribution("imhead").read_text("direct_url.json") or "{}")
    print(url.get("url", "") if url.get("dir_info", {}).get("editable") else "")
except md.PackageNotFoundError:
    print("")
PY
)
if [ "$installed" != "file://$(pwd)" ] || [ ! -x .venv/bin/imhead ]; then
    echo "setup: installing this checkout (editable) for the imhead command"
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
fi
echo "setup: ready: $(pwd)/.venv/bin/python"
