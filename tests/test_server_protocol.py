"""PROTOCOL tests of backend/server.py: framing, handshake, errors, cancel, shutdown and stream safety, run
against a subprocess serving the test-only op table in conftest.py (ProtocolTestBackend). They test the
server's machinery, not product behaviour; the real `python -m backend serve` is tested in
test_server_serve.py."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time

import numpy as np
import pytest

from backend import wire
from conftest import protocol_server_cmd


class RawConn:
    """Byte-level connection to a server subprocess; every receive has a timeout."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd=None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.stdin, self.stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self._frames: queue.Queue = queue.Queue()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        self._err_thread = threading.Thread(target=lambda: self._stderr.extend(stderr), daemon=True)
        self._err_thread.start()

    def _read(self) -> None:
        try:
            while (msg := wire.read_frame(self.stdout)) is not None:
                self._frames.put(msg)
        except wire.ProtocolError as exc:
            self._frames.put(exc)
        self._frames.put(None)

    def send(self, header: dict, arrays: dict | None = None) -> None:
        self.send_raw(wire.encode_bytes(header, arrays))

    def send_raw(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def recv(self, timeout: float = 60.0) -> wire.Message:
        msg = self._frames.get(timeout=timeout)
        assert isinstance(msg, wire.Message), f"expected a frame, got {msg!r}; stderr:\n{self.stderr()}"
        return msg

    def reply(self, rid, timeout: float = 60.0) -> wire.Message:
        """Next reply, skipping progress events (which must belong to open requests)."""
        while True:
            msg = self.recv(timeout)
            if msg.kind == "reply":
                assert msg.id == rid, (msg.header, rid)
                return msg

    def call(self, rid: int, op: str, params: dict | None = None, arrays: dict | None = None) -> wire.Message:
        self.send(wire.request(rid, op, params), arrays)
        return self.reply(rid)

    def handshake(self) -> wire.Message:
        return self.call(0, "handshake", {"protocol": wire.PROTOCOL_VERSION})

    def exit_status(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is not None:
            self._err_thread.join(10)
        return b"".join(self._stderr).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def conn(venv_python):
    c = RawConn(protocol_server_cmd(venv_python))
    yield c
    c.close()


def error_of(msg: wire.Message) -> tuple[str, str]:
    assert msg.header["ok"] is False, msg.header
    return msg.header["error"]["code"], msg.header["error"]["message"]


def test_handshake_carries_the_backend_info(conn):
    msg = conn.handshake()
    assert msg.header["ok"] is True
    p = msg.header["params"]
    assert p["protocol"] == wire.PROTOCOL_VERSION
    assert {"backend_version", "torch_device", "model_name", "trained", "regions", "expressions"} <= set(p)


def test_protocol_mismatch_is_refused_until_a_good_handshake(conn):
    code, message = error_of(conn.call(0, "handshake", {"protocol": 99}))
    assert code == "protocol_mismatch"
    assert "99" in message and str(wire.PROTOCOL_VERSION) in message
    code, message = error_of(conn.call(1, "echo"))
    assert code == "handshake_required" and "99" in message
    assert conn.call(2, "handshake", {"protocol": wire.PROTOCOL_VERSION}).header["ok"]
    assert conn.call(3, "echo", {"a": 1}).header["params"] == {"a": 1}


def test_ops_before_handshake_are_refused(conn):
    code, _ = error_of(conn.call(5, "slow"))
    assert code == "handshake_required"


def test_echo_round_trips_arrays_bit_exactly(conn):
    conn.handshake()
    rng = np.random.default_rng(1)
    arrays = {"pts": rng.standard_normal((100_000, 3)).astype(np.float32), "faces": np.arange(30, dtype=np.int32)
              .reshape(10, 3), "mask": rng.random(17) > 0.5, "f64": rng.standard_normal((2, 2, 2))}
    msg = conn.call(1, "echo", {"nested": {"list": [1, 2.5, "x", None]}}, arrays)
    assert msg.header["params"] == {"nested": {"list": [1, 2.5, "x", None]}}
    for name, a in arrays.items():
        assert msg.arrays[name].dtype == a.dtype
        np.testing.assert_array_equal(msg.arrays[name], a)


def test_structured_errors_and_the_server_keeps_serving(conn):
    conn.handshake()
    assert error_of(conn.call(1, "fail", {"message": "resolution must be > 8"})) == (
        "invalid_input", "resolution must be > 8")
    code, message = error_of(conn.call(2, "crash"))
    assert code == "internal_error" and "ValueError: protocol-test crash" in message
    code, message = error_of(conn.call(3, "bad_reply"))
    assert code == "internal_error" and "complex64" in message
    code, message = error_of(conn.call(6, "exit"))
    assert code == "internal_error" and "SystemExit" in message
    code, message = error_of(conn.call(7, "missing"))
    assert code == "unknown_op" and "does not serve 'missing'" in message
    code, message = error_of(conn.call(4, "no_such_op"))
    assert code == "unknown_op" and "slow" in message
    assert conn.call(5, "echo", {"still": "alive"}).header["params"] == {"still": "alive"}
    conn.send(wire.request(0, "shutdown"))
    conn.reply(0)
    assert conn.exit_status() == 0
    assert "Traceback" in conn.stderr() and "protocol-test crash" in conn.stderr()


def test_malformed_frames_get_error_replies_and_the_stream_stays_in_sync(conn):
    conn.handshake()
    bad_dtype = (b'{"kind":"request","id":11,"op":"echo","params":{},"arrays":[{"name":"a","dtype":"complex64",'
                 b'"shape":[1],"offset":0,"nbytes":8}]}')
    conn.send_raw(wire.PREFIX.pack(wire.MAGIC, len(bad_dtype), 8) + bad_dtype + bytes(8))
    code, message = error_of(conn.reply(11))
    assert code == "protocol_error" and "complex64" in message
    garbage = b"{this is not json"
    conn.send_raw(wire.PREFIX.pack(wire.MAGIC, len(garbage), 3) + garbage + b"xyz")
    code, message = error_of(conn.reply(None))
    assert code == "protocol_error" and "JSON" in message
    reply_frame = wire.encode_bytes(wire.reply_ok(12))
    conn.send_raw(reply_frame)
    assert error_of(conn.reply(12))[0] == "protocol_error"
    assert conn.call(13, "echo", {"ok": 1}).header["params"] == {"ok": 1}


def test_bad_magic_breaks_the_stream_and_the_server_exits_3(conn):
    conn.handshake()
    conn.send_raw(b"GET / HTTP/1.1\r\n\r\n")
    code, message = error_of(conn.reply(None))
    assert code == "protocol_error" and "bad magic" in message
    assert conn.exit_status() == 3
    assert "cannot be resynchronised" in conn.stderr()


def test_truncated_frame_at_end_of_input_exits_3(conn):
    conn.handshake()
    conn.send_raw(wire.encode_bytes(wire.request(1, "echo"), {"x": np.zeros(100)})[:-10])
    conn.proc.stdin.close()
    assert "truncated" in error_of(conn.reply(None))[1]
    assert conn.exit_status() == 3


def test_progress_then_cancel_of_the_running_op(conn):
    conn.handshake()
    conn.send(wire.request(1, "slow", {"seconds": 30, "steps": 3000}))
    first = conn.recv()
    assert first.kind == "progress" and first.id == 1 and 0 <= first.header["fraction"] < 1
    conn.send(wire.request(2, "cancel", {"target": 1}))
    seen = {}
    for _ in range(1000):  # the cancel reply and the cancelled op's reply, in either order
        msg = conn.recv(timeout=10)
        if msg.kind == "reply":
            seen[msg.id] = msg
        if len(seen) == 2:
            break
    assert seen[2].header["params"] == {"target": 1, "state": "running"}
    assert error_of(seen[1])[0] == "cancelled"


def test_cancel_of_a_queued_op_answers_it_at_once(conn):
    conn.handshake()
    conn.send(wire.request(1, "slow", {"seconds": 2, "steps": 20}))
    conn.send(wire.request(2, "slow", {"seconds": 60}))
    conn.send(wire.request(3, "cancel", {"target": 2}))
    replies = {}
    while len(replies) < 3:
        msg = conn.recv()
        if msg.kind == "reply":
            replies[msg.id] = msg
    order = list(replies)
    assert order.index(2) < order.index(1), "the queued op must be answered before the running one ends"
    assert error_of(replies[2]) == ("cancelled", "cancelled before it started")
    assert replies[3].header["params"]["state"] == "queued"
    assert replies[1].header["params"] == {"steps": 20}
    assert conn.call(4, "cancel", {"target": 1}).header["params"]["state"] == "unknown"


def test_duplicate_ids_are_refused(conn):
    conn.handshake()
    conn.send(wire.request(1, "slow", {"seconds": 1, "steps": 10}))
    conn.send(wire.request(1, "echo"))
    msg = conn.recv()
    while msg.kind == "progress":
        msg = conn.recv()
    assert error_of(msg)[0] == "duplicate_id"
    assert conn.reply(1).header["params"] == {"steps": 10}


def test_shutdown_cancels_work_and_exits_0(conn):
    conn.handshake()
    conn.send(wire.request(1, "slow", {"seconds": 60, "steps": 6000}))
    conn.send(wire.request(2, "slow", {"seconds": 60}))
    conn.send(wire.request(3, "shutdown"))
    replies = {}
    while len(replies) < 3:
        msg = conn.recv(timeout=20)
        if msg.kind == "reply":
            replies[msg.id] = msg
    assert error_of(replies[1])[0] == "cancelled" and error_of(replies[2])[0] == "cancelled"
    assert list(replies)[-1] == 3 and replies[3].header["ok"]
    assert conn.exit_status(timeout=20) == 0


def test_end_of_input_exits_0(conn):
    conn.handshake()
    conn.proc.stdin.close()
    assert conn.exit_status() == 0


def test_stray_stdout_output_cannot_corrupt_the_stream(conn):
    conn.handshake()
    msg = conn.call(1, "noisy", {}, {"x": np.arange(4.0)})
    assert msg.header["params"] == {"noisy": True}
    np.testing.assert_array_equal(msg.arrays["x"], np.arange(4.0) * 2)
    assert conn.call(2, "echo").header["ok"]
    conn.proc.stdin.close()
    assert conn.exit_status() == 0
    assert "stray print to stdout" in conn.stderr() and "stray bytes written to fd 1" in conn.stderr()


def test_failed_session_start_is_an_error_reply_not_a_dead_process(venv_python):
    conn = RawConn(protocol_server_cmd(venv_python), env={"IMHEAD_TEST_FACTORY_FAIL": "1"})
    try:
        assert error_of(conn.handshake()) == ("weights_error", "protocol-test: weights deliberately missing")
        assert error_of(conn.call(1, "slow"))[0] == "weights_error"
        assert conn.call(2, "echo").header["ok"]
        assert conn.proc.poll() is None
    finally:
        conn.close()


def test_a_dying_op_ends_the_process_with_its_status(conn):
    conn.handshake()
    conn.send(wire.request(1, "die", {"status": 7}))
    assert conn.exit_status() == 7
    assert "dying now" in conn.stderr()


def _wait_for_log(conn: RawConn, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := b"".join(conn._stderr).decode(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} not logged; stderr:\n{log}"
        time.sleep(0.05)
    return log


def test_warm_up_runs_once_after_the_first_handshake(conn):
    conn.handshake()
    _wait_for_log(conn, "warm-up done")
    conn.handshake()
    assert conn.call(1, "echo", {"a": 1}).header["params"] == {"a": 1}
    log = _wait_for_log(conn, "warm-up done")
    assert log.count("protocol-test: warming up") == 1 and log.count("warm-up done") == 1


def test_a_failing_warm_up_is_logged_and_the_server_keeps_serving(venv_python):
    c = RawConn(protocol_server_cmd(venv_python), env={"IMHEAD_TEST_WARM_UP": "fail"})
    try:
        c.handshake()
        assert "deliberately failed" in _wait_for_log(c, "warm-up failed")
        assert c.call(1, "echo", {"a": 1}).header["params"] == {"a": 1}
    finally:
        c.close()


def test_a_request_waiting_at_the_handshake_goes_first_and_skips_the_warm_up(venv_python):
    # the backend takes 1 s to build, so the request is queued before the handshake's reply
    c = RawConn(protocol_server_cmd(venv_python), env={"IMHEAD_TEST_FACTORY_DELAY": "1"})
    try:
        c.send_raw(wire.encode_bytes(wire.request(0, "handshake", {"protocol": wire.PROTOCOL_VERSION}))
                   + wire.encode_bytes(wire.request(1, "echo", {"a": 1})))
        assert c.reply(0).header["ok"] and c.reply(1).header["params"] == {"a": 1}
        assert c.call(2, "echo", {}).header["ok"]
        assert "warming up" not in c.stderr()
    finally:
        c.close()
