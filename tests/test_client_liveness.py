"""Liveness (issue 17) with the protocol-test server: the heartbeat keeps a quiet op alive, a stopped backend
(SIGSTOP) is reported hung within 10 s, cancel abandons a request at once, and every call the add-on makes from
Blender's main thread returns within 50 ms even while the backend is stopped. Restart SIGKILLs it."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import time

import pytest

from conftest import protocol_server_cmd
from imhead_blender.client import HUNG_AFTER_S, BackendClient

UI_BUDGET_S = 0.05


@pytest.fixture
def client(tmp_path, venv_python, repo_root):
    launcher = tmp_path / "python"
    launcher.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(c) for c in protocol_server_cmd(venv_python)) + "\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    c = BackendClient(str(launcher), str(repo_root))
    yield c
    if c._proc is not None and c._proc.poll() is None:
        os.kill(c._proc.pid, signal.SIGKILL)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def ready(client: BackendClient) -> None:
    client.start()
    deadline = time.monotonic() + 60
    while client.handshake is None:
        assert time.monotonic() < deadline and client.alive(), "no handshake"
        client.pump(0.05)


def test_the_heartbeat_keeps_a_quiet_op_from_looking_hung(client):
    ready(client)
    future = client.submit("slow", {"seconds": 4.0, "steps": 1})  # one progress report, then 4 s of silence
    heard, gaps = client._heard_at, []
    while not future.done():
        client.pump(0.05)
        assert not client.hung()
        if client._heard_at != heard:
            gaps.append(client._heard_at - heard)
            heard = client._heard_at
    assert future.result()[0] == {"steps": 1}
    assert len(gaps) >= 3 and max(gaps) < 2.0, gaps  # the server's 1 s heartbeat, not the op's reports


def test_a_stopped_backend_is_hung_within_10_s_and_the_ui_thread_never_waits(client):
    ready(client)
    running = client.submit("slow", {"seconds": 60, "steps": 600})
    while running.progress == 0.0:
        client.pump(0.05)
    proc = client._proc
    os.kill(proc.pid, signal.SIGSTOP)
    stopped_at, slowest = time.monotonic(), 0.0
    while not client.hung():
        _, dt = timed(client.pump)
        slowest = max(slowest, dt)
        assert time.monotonic() - stopped_at < 10, "not reported hung within 10 s"
        time.sleep(0.05)
    detected_s = time.monotonic() - stopped_at
    assert HUNG_AFTER_S <= detected_s < 10

    _, t_cancel = timed(client.cancel, running)
    assert running.done() and running._failure.code == "cancelled"
    late, t_submit = timed(client.submit, "echo", {"x": 1})
    _, t_pump = timed(client.pump)
    _, t_shutdown = timed(client.shutdown)
    assert late.done() and late._failure.code == "cancelled"
    assert proc.wait(5) == -signal.SIGKILL  # a hung backend gets no grace
    _, t_start = timed(client.start)
    slowest = max(slowest, t_cancel, t_submit, t_pump, t_shutdown, t_start)
    print(f"\nhung after {detected_s:.1f} s; UI-thread calls: cancel {t_cancel * 1e3:.1f} ms, submit "
          f"{t_submit * 1e3:.1f} ms, shutdown {t_shutdown * 1e3:.1f} ms, start {t_start * 1e3:.1f} ms, slowest "
          f"pump/call {slowest * 1e3:.1f} ms")
    assert slowest < UI_BUDGET_S
    ready(client)
    assert client.wait(client.submit("echo", {"restarted": True}), 30)[0] == {"restarted": True}


def test_a_backend_that_resumes_is_no_longer_hung(client):
    ready(client)
    running = client.submit("slow", {"seconds": 12, "steps": 120})
    while running.progress == 0.0:
        client.pump(0.05)
    os.kill(client._proc.pid, signal.SIGSTOP)
    while not client.hung():
        client.pump(0.1)
    os.kill(client._proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while client.hung():
        assert time.monotonic() < deadline
        client.pump(0.1)
    assert client.wait(running, 60)[0] == {"steps": 120}


def test_restart_of_a_healthy_backend_returns_at_once_and_it_exits_by_itself(client):
    ready(client)
    proc = client._proc
    running = client.submit("slow", {"seconds": 60, "steps": 600})
    _, t = timed(client.shutdown)
    assert t < UI_BUDGET_S and running.done()
    assert proc.wait(10) == 0
