"""Fuzzing the real `python -m backend serve` over stdio (issue 17): seeded, bounded mutations of valid
requests. Well-framed ones must each get a reply and leave the server serving, with bounded memory; a broken
stream must end in a protocol_error reply and exit status 3. The client's reader gets the same streams.
docs/reliability.md has the figures this prints."""

from __future__ import annotations

import collections
import io
import os
import queue
import subprocess
import threading
import time

import numpy as np

from backend import wire
from fuzz_frames import WELL_FRAMED, mutate_kind
from imhead_blender.client import BackendClient

N_WELL_FRAMED = 4000
N_BROKEN = 8
MEMORY_BUDGET_MB = "900"  # resolutions above ~140 are refused by the memory guard: a mutated request stays cheap


def base_request(rid: int, rng: np.random.Generator) -> bytes:
    kind = rng.integers(10)
    if kind < 4:
        return wire.encode_bytes(wire.request(rid, "echo", {"note": "fuzz", "n": [1, 2]}),
                                 {"p": rng.random((4, 3), np.float32), "i": np.arange(6, dtype=np.int32)})
    if kind < 6:
        return wire.encode_bytes(wire.request(rid, "cancel", {"target": rid - 1}))
    if kind < 8:
        return wire.encode_bytes(wire.request(rid, "edit", {"head": {"format": "imhead-head/1", "identity": [0.0]},
                                                            "ops": [{"op": "reset", "regions": "all"}],
                                                            "resolution": 16}))
    if kind < 9:
        return wire.encode_bytes(wire.request(rid, "deform", {"head": 3}),
                                 {"canonical": np.zeros((2, 3), np.float32)})
    return wire.encode_bytes(wire.request(rid, "generate", {"seed": 1, "resolution": 16}))


def expected_id(frame: bytes):
    """The id the server must answer for this frame (None: a reply with id null)."""
    try:
        msg = wire.decode(frame)
    except wire.ProtocolError as exc:
        return exc.request_id
    return msg.id if msg.kind == "request" else msg.id


class Server:
    def __init__(self, python: str, root, args: tuple | list = (), **env: str):
        self.proc = subprocess.Popen([python, "-m", "backend", "serve", *args], cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(root), **env})
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.stdin, self.stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.replies: list[wire.Message | None] = []  # None: the server's output ended
        self.progress_of: int | None = None  # the request whose progress frames are timed
        self.progress_times: list[float] = []
        self.arrived = threading.Condition()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(stderr), daemon=True).start()

    def _read(self) -> None:
        try:
            while (msg := wire.read_frame(self.stdout)) is not None:
                if msg.kind == "progress" and msg.id == self.progress_of:
                    self.progress_times.append(time.monotonic())
                if msg.kind == "reply":
                    with self.arrived:
                        self.replies.append(msg)
                        self.arrived.notify_all()
        finally:
            with self.arrived:
                self.replies.append(None)
                self.arrived.notify_all()

    def send(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def reply_to(self, rid: int, timeout: float) -> wire.Message:
        with self.arrived:
            ok = self.arrived.wait_for(lambda: any(m is None or m.id == rid for m in self.replies), timeout)
            assert ok, f"no reply to {rid} within {timeout} s (a hang)"
            msg = next(m for m in self.replies if m is None or m.id == rid)
        assert msg is not None, "the server exited:\n" + self.log()[-3000:]
        return msg

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def test_fuzzed_frames_never_stop_the_real_server(venv_python, repo_root) -> None:
    t0 = time.monotonic()
    server = Server(venv_python, repo_root, IMHEAD_MEMORY_BUDGET_MB=MEMORY_BUDGET_MB)
    try:
        server.send(wire.encode_bytes(wire.request(1, "handshake", {"protocol": wire.PROTOCOL_VERSION})))
        assert server.reply_to(1, 120).header["ok"]
        server.send(wire.encode_bytes(wire.request(2, "generate", {"seed": 0, "resolution": 16})))
        assert server.reply_to(2, 120).header["ok"]
        rss_before = server.rss_mb()
        t_fuzz = time.monotonic()

        rng = np.random.default_rng(2017)
        expected: list = []
        for i in range(N_WELL_FRAMED):
            frame = mutate_kind(base_request(1000 + i, rng), int(rng.choice(WELL_FRAMED)), rng)
            expected.append(expected_id(frame))
            server.send(frame)
        # queued behind every job the frames started, so its reply means all of them were answered
        server.send(wire.encode_bytes(wire.request(99, "echo", {"after": True})))
        last = server.reply_to(99, 120)
        fuzz_s = time.monotonic() - t_fuzz
        assert last.header["ok"] and last.header["params"] == {"after": True}  # a valid request still works
        rss_after = server.rss_mb()
        assert server.proc.poll() is None, "the server died"
    finally:
        server.proc.kill()
        server.proc.wait(10)
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    replies = [m for m in server.replies if m is not None and m.id not in (1, 2, 99)]
    answered = collections.Counter(m.id for m in replies)
    missing = [e for e in expected if e is not None and e not in answered]
    assert not missing, f"no reply for request ids {missing[:20]}"
    assert len(replies) >= N_WELL_FRAMED
    codes = collections.Counter("ok" if m.header["ok"] else m.header["error"]["code"] for m in replies)
    assert "internal_error" not in codes and "protocol_error" in codes, codes
    assert rss_after - rss_before < 50
    print(f"\nserver fuzz: {N_WELL_FRAMED} well-framed frames in {fuzz_s:.1f} s, {len(replies)} replies "
          f"{dict(sorted(codes.items()))}, rss {rss_before:.0f} -> {rss_after:.0f} MB, "
          f"total {time.monotonic() - t0:.1f} s")


def test_a_broken_stream_ends_in_a_protocol_error_and_exit_3(venv_python, repo_root):
    rng = np.random.default_rng(3)
    fatal = 0
    for i in range(200):
        frame = mutate_kind(base_request(5, rng), int(rng.choice([0, 1, 2, 4])), rng)
        try:
            wire.read_frame(io.BytesIO(frame))
            continue
        except wire.ProtocolError as exc:
            if not exc.fatal:
                continue
        fatal += 1
        server = Server(venv_python, repo_root)
        try:
            server.send(frame)
            server.proc.stdin.close()  # a truncated frame is only known at end of input
            assert server.proc.wait(30) == 3, server.log()[-2000:]
            msg = server.reply_to(None, 10)
            assert msg.header["error"]["code"] == "protocol_error"
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
        if fatal == N_BROKEN:
            break
    assert fatal == N_BROKEN


def test_the_client_reader_survives_fuzzed_streams() -> None:
    """BackendClient's reader thread over 1,000 mutated reply/progress streams: each ends in events the client
    handles (frames, then bad_frame or eof), never in an exception that kills the thread silently."""
    rng = np.random.default_rng(4)
    client = BackendClient("python", ".")
    valid = [wire.encode_bytes(wire.reply_ok(3, {"n": 1}), {"v": np.ones((5, 3), np.float32)}),
             wire.encode_bytes(wire.progress(3, 0.25, "a quarter")),
             wire.encode_bytes(wire.reply_error(3, "invalid_input", "seed must be an integer"))]
    ends: collections.Counter[str] = collections.Counter()
    errors: list = []
    hook, threading.excepthook = threading.excepthook, errors.append
    try:
        for _ in range(1000):
            stream = io.BytesIO(mutate_kind(valid[rng.integers(3)], int(rng.integers(8)), rng) + valid[0])
            events: queue.Queue = queue.Queue()
            t = threading.Thread(target=client._read_frames, args=(client._generation, stream, events))
            t.start()
            t.join(10)
            assert not t.is_alive(), "the reader hung"
            kinds = [events.get_nowait()[1] for _ in range(events.qsize())]
            assert kinds[-1] == "eof" and set(kinds) <= {"frame", "bad_frame", "eof"}, kinds
            ends["bad_frame" if "bad_frame" in kinds else "clean"] += 1
    finally:
        threading.excepthook = hook
    assert not errors, errors[:3]
    assert ends["bad_frame"] > 500 and ends["clean"] > 10, ends
