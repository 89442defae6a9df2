"""imhead_blender/client.py over a real subprocess running the PROTOCOL-TEST server (conftest.py's op table):
futures, progress, errors, cancel, timeouts, death and restart. The client is handed a small launcher script
as its "python"; it execs the venv python on the protocol-test server instead of `-m backend serve`. The real
`python -m backend serve` is exercised in test_client_serve.py."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import time

import numpy as np
import pytest

from backend import wire
from conftest import protocol_server_cmd
from imhead_blender.client import BackendClient, BackendFailure


def launcher(tmp_path, command: list[str], name="python") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(c) for c in command) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def make_client(tmp_path, venv_python, repo_root):
    clients = []

    def make(command=None, **kwargs) -> BackendClient:
        python = launcher(tmp_path, command or protocol_server_cmd(venv_python), f"python{len(clients)}")
        client = BackendClient(python, str(repo_root), **kwargs)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.shutdown(timeout=5)


def wait_handshake(client: BackendClient, timeout=60.0):
    deadline = time.monotonic() + timeout
    while client.handshake is None and client.alive():
        assert time.monotonic() < deadline, "no handshake"
        client.pump(0.05)
    return client.handshake


def test_handshake_and_array_round_trip(make_client):
    client = make_client()
    assert not client.alive() and client.handshake is None
    client.start()
    assert client.alive()
    hs = wait_handshake(client)
    assert hs.protocol == wire.PROTOCOL_VERSION and hs.model_name == "protocol-test" and hs.trained is False
    assert hs.info["regions"] == [] and hs.torch_device == "none"
    pts = np.random.default_rng(0).standard_normal((50_000, 3)).astype(np.float32)
    future = client.submit("echo", {"k": [1, 2]}, {"pts": pts, "faces": np.arange(9, dtype=np.int32).reshape(3, 3)})
    params, arrays = client.wait(future, 30)
    assert params == {"k": [1, 2]}
    np.testing.assert_array_equal(arrays["pts"], pts)
    assert arrays["faces"].dtype == np.int32


def test_submit_does_not_block_and_callbacks_run_inside_pump(make_client):
    client = make_client()
    client.start()
    t0 = time.monotonic()
    future = client.submit("slow", {"seconds": 1.0, "steps": 20})
    assert time.monotonic() - t0 < 0.5 and not future.done()
    with pytest.raises(BackendFailure) as info:
        future.result()
    assert info.value.code == "not_done"
    calls = []
    future.add_done_callback(lambda f: calls.append(f.result()))
    fractions = []
    while not future.done():
        client.pump(0.05)
        fractions.append(future.progress)
    assert calls == [({"steps": 20}, {})]
    assert any(0 < f < 1 for f in fractions), "progress events must reach the future"
    assert fractions == sorted(fractions) and future.progress == 1.0
    late = []
    future.add_done_callback(late.append)
    assert late == [future]


def test_error_replies_become_backend_failures(make_client):
    client = make_client()
    client.start()
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("fail", {"message": "seed must be an integer"}), 30)
    assert (info.value.code, info.value.message) == ("invalid_input", "seed must be an integer")
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("crash", {}), 30)
    assert info.value.code == "internal_error" and "protocol-test crash" in info.value.message
    bad = client.submit("echo", {}, {"c": np.zeros(2, np.complex128)})
    assert bad.done() and bad._failure.code == "invalid_input"
    assert client.wait(client.submit("echo", {"again": True}), 30)[0] == {"again": True}


def test_malformed_frame_through_the_client_pipe_is_refused_and_serving_continues(make_client):
    client = make_client()
    client.start()
    wait_handshake(client)
    garbage = b'{"kind": "request", "id": '
    client._outbox.put(wire.PREFIX.pack(wire.MAGIC, len(garbage), 0) + garbage)
    assert client.wait(client.submit("echo", {"n": 1}), 30)[0] == {"n": 1}
    assert client.last_error is not None and client.last_error.code == "protocol_error"
    assert client.alive()


def test_cancel_a_running_request(make_client):
    client = make_client()
    client.start()
    future = client.submit("slow", {"seconds": 60, "steps": 6000})
    while future.progress == 0.0:
        client.pump(0.05)
    client.cancel(future)
    with pytest.raises(BackendFailure) as info:
        client.wait(future, 20)
    assert info.value.code == "cancelled"
    assert client.alive()


def test_request_timeout_fails_the_future_and_cancels_the_op(make_client):
    client = make_client(request_timeout=1.0)
    client.start()
    wait_handshake(client)
    t0 = time.monotonic()
    future = client.submit("slow", {"seconds": 60, "steps": 600})
    with pytest.raises(BackendFailure) as info:
        client.wait(future, 30)
    assert info.value.code == "timeout" and time.monotonic() - t0 < 10
    # the op was cancelled on the server, so the next request is served promptly
    assert client.wait(client.submit("echo", {"x": 1}), 10)[0] == {"x": 1}


def test_wait_has_its_own_timeout(make_client):
    client = make_client()
    client.start()
    future = client.submit("slow", {"seconds": 5, "steps": 50})
    with pytest.raises(BackendFailure) as info:
        client.wait(future, 0.3)
    assert info.value.code == "timeout" and not future.done()


def test_startup_timeout_when_nothing_answers(make_client, venv_python):
    client = make_client([venv_python, "-c", "import time; time.sleep(120)"], startup_timeout=1.0)
    client.start()
    pending = client.submit("echo", {})
    with pytest.raises(BackendFailure) as info:
        client.wait(pending, 30)
    assert info.value.code == "startup_timeout"
    assert not client.alive() and client.last_error.code == "startup_timeout"


def test_killed_backend_fails_requests_then_restart_works(make_client):
    client = make_client()
    client.start()
    wait_handshake(client)
    running = client.submit("slow", {"seconds": 60, "steps": 600})
    os.kill(client._proc.pid, signal.SIGKILL)
    with pytest.raises(BackendFailure) as info:
        client.wait(running, 30)
    assert info.value.code == "backend_died" and "killed by signal 9" in info.value.message
    assert not client.alive()
    after = client.submit("echo", {})
    assert after.done()
    with pytest.raises(BackendFailure) as info:
        after.result()
    assert info.value.code == "backend_died"
    client.start()
    assert wait_handshake(client) is not None
    assert client.wait(client.submit("echo", {"restarted": 1}), 30)[0] == {"restarted": 1}


def test_next_request_after_an_unnoticed_death_fails_clearly(make_client):
    client = make_client()
    client.start()
    wait_handshake(client)
    client._proc.kill()
    client._proc.wait(10)
    future = client.submit("echo", {})  # pump() has not run since the kill
    with pytest.raises(BackendFailure) as info:
        future.result()
    assert info.value.code == "backend_died"


def test_crash_inside_an_op_reports_exit_status_and_stderr(make_client):
    client = make_client()
    client.start()
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("die", {"status": 7}), 30)
    assert info.value.code == "backend_died"
    assert "exited with status 7" in info.value.message and "dying now" in info.value.message


def test_protocol_mismatch_stops_the_backend_with_a_clear_error(make_client, monkeypatch):
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", 99)
    client = make_client()
    client.start()
    pending = client.submit("echo", {})
    with pytest.raises(BackendFailure) as info:
        client.wait(pending, 30)
    assert info.value.code == "protocol_mismatch"
    assert "99" in info.value.message and "protocol 1" in info.value.message
    assert not client.alive() and client.handshake is None


def test_garbage_on_stdout_stops_the_backend(make_client, venv_python):
    client = make_client([venv_python, "-c", "import sys, time; sys.stdout.write('hello, this is not a frame'); "
                                             "sys.stdout.flush(); time.sleep(60)"])
    client.start()
    with pytest.raises(BackendFailure) as info:
        client.wait(client.submit("echo", {}), 30)
    assert info.value.code == "protocol_error" and "bad magic" in info.value.message
    assert not client.alive()


def test_shutdown_exits_and_fails_open_requests(make_client):
    client = make_client()
    client.start()
    wait_handshake(client)
    future = client.submit("slow", {"seconds": 60, "steps": 6000})
    failed = []
    future.add_done_callback(failed.append)
    proc = client._proc
    client.shutdown(timeout=10)  # returns at once; the process exits by itself within the grace period
    assert not client.alive() and proc.wait(10) == 0
    assert failed == [future] and future._failure.code == "cancelled"
    late = client.submit("echo", {})
    assert late.done() and late._failure.code == "not_running"


def test_start_with_a_missing_interpreter_raises(tmp_path, repo_root):
    client = BackendClient(str(tmp_path / "no-python"), str(repo_root))
    with pytest.raises(BackendFailure) as info:
        client.start()
    assert info.value.code == "not_running" and "no-python" in info.value.message
    assert client.submit("echo", {}).done()
