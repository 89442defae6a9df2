"""The client against the REAL `python -m backend serve` (engine Session, real network, real marching cubes):
handshake, generate with arrays back, structured errors, a malformed frame, death and restart."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest

from backend import wire
from imhead_blender.client import BackendClient, BackendFailure

RESOLUTION = 32  # small grid: this tests the process boundary, not extraction quality


def start(venv_python, repo_root) -> BackendClient:
    c = BackendClient(venv_python, str(repo_root), startup_timeout=120, request_timeout=300)
    c.start()
    return c


@pytest.fixture(scope="module")
def client(venv_python, repo_root):
    """One backend for the tests that leave it running (loading torch and the model takes seconds)."""
    c = start(venv_python, repo_root)
    yield c
    c.shutdown(timeout=10)


@pytest.fixture
def own_client(venv_python, repo_root):
    c = start(venv_python, repo_root)
    yield c
    c.shutdown(timeout=10)


def handshake(client: BackendClient):
    client.wait(client.submit("echo", {}), 120)  # queued behind the handshake, so both are done after it
    assert client.handshake is not None, client.last_error
    return client.handshake


def test_handshake_reports_the_model(client):
    hs = handshake(client)
    assert hs.protocol == wire.PROTOCOL_VERSION
    assert hs.torch_device == "cpu"  # the test machines have no GPU; "auto" must fall back
    assert hs.backend_version and hs.model_name
    assert isinstance(hs.trained, bool)
    regions, names = hs.info["regions"], hs.info["expressions"]
    assert len(regions) == 39 and all(set(r) == {"id", "name", "mirror"} for r in regions)
    assert [r["id"] for r in regions] == list(range(39))
    assert len(names) == 53 and len(set(names)) == 53 and all(isinstance(n, str) for n in names)


def test_generate_returns_a_mesh_over_the_wire(client):
    params, arrays = client.wait(client.submit("generate", {"seed": 3, "resolution": RESOLUTION}), 300)
    v, f = arrays["vertices"], arrays["faces"]
    assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3 and len(v) > 100
    assert f.dtype == np.int32 and f.shape[1] == 3 and 0 <= f.min() and f.max() < len(v)
    assert arrays["canonical"].shape == v.shape
    assert len(params["head"]["identity"]) == 256


def test_bad_parameters_come_back_as_invalid_input(client):
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("generate", {"seed": 1, "resolution": 3}), 120)
    assert info.value.code == "invalid_input" and "resolution" in info.value.message
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("teleport", {}), 120)
    assert info.value.code == "unknown_op"
    assert client.alive()


def test_malformed_frame_gets_an_error_reply_and_the_server_keeps_serving(client):
    handshake(client)
    header = (b'{"kind":"request","id":999999,"op":"echo","params":{},"arrays":[{"name":"a","dtype":"float32",'
              b'"shape":[4],"offset":0,"nbytes":12}]}')
    client._outbox.put(wire.PREFIX.pack(wire.MAGIC, len(header), 12) + header + bytes(12))
    params, arrays = client.wait(client.submit("echo", {"after": 1}, {"x": np.arange(3.0)}), 60)
    assert params == {"after": 1} and arrays["x"].tolist() == [0.0, 1.0, 2.0]
    assert client.alive()


def test_killed_backend_gives_backend_died_then_restart_works_then_shutdown_exits_0(own_client):
    client = own_client
    handshake(client)
    os.kill(client._proc.pid, signal.SIGKILL)
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("generate", {"seed": 0, "resolution": RESOLUTION}), 60)
    assert info.value.code == "backend_died" and "killed by signal 9" in info.value.message
    assert not client.alive()
    client.start()
    assert handshake(client).protocol == wire.PROTOCOL_VERSION
    params, arrays = client.wait(client.submit("echo", {"restarted": True}, {"x": np.ones(3)}), 60)
    assert params == {"restarted": True} and arrays["x"].sum() == 3
    proc = client._proc
    client.shutdown(timeout=30)  # returns at once; the backend exits 0 by itself
    assert proc.wait(30) == 0


def test_a_python_without_torch_gets_a_clear_environment_error(venv_python, repo_root, tmp_path):
    """A backend root whose `torch` cannot be imported (a shadowing package that raises ImportError, as a
    Python without torch would): the handshake fails with a message naming the interpreter and torch."""
    shutil.copytree(repo_root / "backend", tmp_path / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named torch', name='torch')\n")
    c = BackendClient(venv_python, str(tmp_path), startup_timeout=60)
    c.start()
    with pytest.raises(BackendFailure) as info:
        c.wait(c.submit("echo", {}), 60)
    assert info.value.code == "environment_error"
    assert venv_python in info.value.message and "cannot import torch" in info.value.message
    assert not c.alive() and c.last_error.code == "environment_error"


def test_start_refuses_a_folder_without_the_backend(venv_python, tmp_path):
    c = BackendClient(venv_python, str(tmp_path))
    with pytest.raises(BackendFailure) as info:
        c.start()
    assert info.value.code == "not_running" and "backend/__main__.py" in info.value.message
