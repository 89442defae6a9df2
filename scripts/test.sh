#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
status=0
.venv/bin/python -m pytest -q tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; treating that as a failure" >&2
fi
exit "$status"
