#!/usr/bin/env bash
# The README's test command: set up .venv, lint (ruff) and type-check (mypy) the tree, then run the whole
# pytest suite. Extra arguments go to pytest. Any lint or type finding fails the run (pytest still runs, so
# one pass shows everything).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
lint=0
echo "test: ruff check"
.venv/bin/ruff check . || lint=1
echo "test: mypy"
.venv/bin/mypy || lint=1
status=0
.venv/bin/python -m pytest -q tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; treating that as a failure" >&2
fi
if [ "$lint" -ne 0 ]; then
    echo "test: ruff or mypy reported findings (see above)" >&2
    if [ "$status" -eq 0 ]; then
        status=1
    fi
fi
exit "$status"
