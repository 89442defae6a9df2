"""Shared fixtures: the repository root, the venv's python, a built extension zip, and the protocol-test
backend (an op table for testing the server's framing, errors, cancel and shutdown — NOT product behaviour;
product ops are the engine Session's, tested by the engine's tests and by the real-server tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def run_python():
    """run_python(code, **env) -> the stdout of `code` run in a fresh interpreter at the repository root, with
    extra environment variables (e.g. TRITON_INTERPRET="1", read when triton is imported; or to see which
    modules a call imports). A non-zero exit fails the test with the end of stderr."""

    def run(code: str, **env: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, **env}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    return run


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter the add-on should use: the repo's .venv, else the one running the tests."""
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


@pytest.fixture(scope="session")
def built_zip(tmp_path_factory, venv_python) -> Path:
    """`build.py` run once per test session into a temporary dist folder."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([venv_python, str(REPO / "build.py"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"build.py failed:\n{proc.stdout}\n{proc.stderr}"
    zips = list(out.glob("imhead-*.zip"))
    assert len(zips) == 1, zips
    assert zipfile.is_zipfile(zips[0])
    return zips[0]


# --------------------------------------------------------------------------------- protocol-test backend


class ProtocolTestBackend:
    """Ops that exercise the server's machinery: progress + cancel, errors, crashes, stray stdout."""

    def __init__(self):
        from backend.errors import WeightsError

        if os.environ.get("IMHEAD_TEST_FACTORY_FAIL"):
            raise WeightsError("protocol-test: weights deliberately missing")
        time.sleep(float(os.environ.get("IMHEAD_TEST_FACTORY_DELAY", "0")))

    def info(self) -> dict:
        return {"backend_version": "protocol-test", "torch_device": "none", "model_name": "protocol-test",
                "trained": False, "regions": [], "expressions": []}

    def warm_up(self) -> None:
        if os.environ.get("IMHEAD_TEST_WARM_UP") == "fail":
            raise RuntimeError("protocol-test: warm-up deliberately failed")
        print("protocol-test: warming up", file=sys.stderr, flush=True)

    def slow(self, params, arrays, progress):
        from backend.errors import Cancelled

        steps = int(params.get("steps", 50))
        for i in range(steps):
            if progress.cancelled:
                raise Cancelled()
            progress.report(i / steps, f"step {i}")
            time.sleep(float(params.get("seconds", 1.0)) / steps)
        return {"steps": steps}, {}

    def fail(self, params, arrays, progress):
        from backend.errors import InvalidInput

        raise InvalidInput(params.get("message", "bad input"))

    def crash(self, params, arrays, progress):
        raise ValueError("protocol-test crash")

    def exit(self, params, arrays, progress):
        sys.exit(4)

    def die(self, params, arrays, progress):
        print("protocol-test: dying now", file=sys.stderr, flush=True)
        os._exit(int(params.get("status", 9)))

    def noisy(self, params, arrays, progress):
        print("stray print to stdout")
        os.write(1, b"stray bytes written to fd 1\n")
        return {"noisy": True}, {"x": arrays["x"] * 2}

    def bad_reply(self, params, arrays, progress):
        import numpy as np

        return {}, {"z": np.zeros(2, np.complex64)}


PROTOCOL_TEST_OPS = ("slow", "fail", "crash", "exit", "die", "noisy", "bad_reply", "missing")  # no `missing`


def run_protocol_server() -> int:
    """Entry point of the protocol-test server subprocess (see `protocol_server_cmd`)."""
    from backend.server import Server, take_stdout

    frames = take_stdout()
    return Server(ProtocolTestBackend, PROTOCOL_TEST_OPS, sys.stdin.buffer, frames, shutdown_grace_s=5).serve()


def protocol_server_cmd(python: str) -> list[str]:
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]; import conftest; "
            "sys.exit(conftest.run_protocol_server())")
    return [python, "-c", code]
