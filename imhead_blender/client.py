"""Client for the backend subprocess (`python -m backend serve`, docs/protocol.md) — bpy-free, numpy only.

An actor in the style of Dream Textures' generator_process: `submit()` hands an encoded frame to a writer
thread and returns a `Future` at once; a reader thread decodes stdout frames into a queue; `pump()` applies
them on the caller's thread (Blender's main thread), so futures change state and done-callbacks run only
there. `pump()` is callable directly because timers never fire when Blender runs as a module.

The futures and their failures are client_futures.py; spawning, the writer/stderr/reaper threads and the death
message are backend_process.py; the backend's codec and payload modules come through backend_modules.py.
"""

from __future__ import annotations

import itertools
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from .backend_modules import payloads, wire  # the add-on's modules import `payloads` from here
from .backend_process import (EOF_GRACE_S, KILL_GRACE_S, STDERR_TAIL_LINES, death_message, has_backend, read_stderr,
                              reap_process, spawn, write_frames)
from .client_futures import BackendFailure, Future, Handshake, check_reply, parse_handshake

# The server repeats each open request's progress every second (its heartbeat); this much silence while a request
# is open means the backend is hung (stopped, deadlocked, or swapping), reported by hung() and the panel.
HUNG_AFTER_S = 6.0


class BackendClient:
    """`python` runs `-m backend serve` with cwd and PYTHONPATH = `backend_root` (the folder holding backend/
    and weights/). `env` adds to (and overrides) the inherited environment."""

    def __init__(self, python: str, backend_root: str, *, startup_timeout: float = 60.0,
                 request_timeout: float = 600.0, env: dict | None = None):
        self.python = python
        self.backend_root = str(backend_root)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.env = dict(env or {})
        self.handshake: Handshake | None = None
        self.last_error: BackendFailure | None = None  # why the backend stopped or a frame was refused
        self._proc: subprocess.Popen | None = None
        self._generation = 0  # events from a previous process are ignored after a restart
        self._events: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._handshake_id: int | None = None
        self._stopped: BackendFailure | None = BackendFailure("not_running", "the backend is not started")
        self._ready: list[Callable[[], None]] = []  # callbacks to run at the end of this pump
        self._heard_at = 0.0  # monotonic time of the last frame from this generation's process (reader thread)
        self._busy_since = 0.0  # when the open requests went from none to some
        self._eof_at: float | None = None  # end of stdout seen; the death is reported once its status is known

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Spawn the backend (no-op while it is alive) and send the handshake; returns without waiting."""
        if self.alive():
            return
        self._reap()
        if not has_backend(self.backend_root):
            self._stopped = self.last_error = BackendFailure(
                "not_running", f"{self.backend_root} does not contain the imhead backend (backend/__main__.py)")
            raise self._stopped
        try:
            proc = spawn(self.python, self.backend_root, self.env)
        except OSError as exc:
            self._stopped = self.last_error = BackendFailure(
                "not_running", f"cannot start the backend with {self.python}: {exc}")
            raise self._stopped from None
        self._generation += 1
        self._proc, self._stopped, self.handshake = proc, None, None
        self._heard_at, self._eof_at = 0.0, None
        self._events, self._outbox = queue.Queue(), queue.Queue()
        self._stderr_tail.clear()
        gen = self._generation
        self._threads = [
            threading.Thread(target=self._read_frames, args=(gen, proc.stdout, self._events), daemon=True),
            threading.Thread(target=write_frames, args=(gen, proc.stdin, self._outbox, self._events), daemon=True),
            threading.Thread(target=read_stderr, args=(proc.stderr, self._stderr_tail), daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._handshake_id = self._send_payload(payloads.HandshakeRequest(wire.PROTOCOL_VERSION),
                                                self.startup_timeout).request_id

    def alive(self) -> bool:
        return self._stopped is None and self._proc is not None and self._proc.poll() is None

    def stop_reason(self) -> BackendFailure | None:
        """Why the backend is not running (its death is reported here at once if pump() has not yet), or None
        while it runs."""
        return None if self.alive() else self._not_running()

    def hung(self) -> bool:
        """True while requests are open and the running backend has sent nothing, not even its heartbeat, for
        HUNG_AFTER_S. It clears by itself if frames arrive again. Before the first frame the start-up timeout
        applies instead."""
        return self.silent_for() > HUNG_AFTER_S

    def silent_for(self) -> float:
        """Seconds the backend has been silent while requests were open (0 when idle, starting or stopped)."""
        if not self._pending or not self._heard_at or not self.alive():
            return 0.0
        return time.monotonic() - max(self._heard_at, self._busy_since)

    def shutdown(self, timeout: float = KILL_GRACE_S) -> None:
        """Ask the backend to exit and return at once: a reaper thread SIGKILLs it if it is still there after
        `timeout` seconds (at once when it is hung). Open requests fail with "cancelled"; their callbacks run
        here."""
        if self._proc is None:
            return
        hung = self.hung()
        if self.alive() and not hung:
            self._send_payload(payloads.ShutdownRequest(), timeout)
            self._outbox.put(None)  # the writer closes stdin after the shutdown frame
        self._stop(BackendFailure("not_running", "the backend was shut down; start() it again"),
                   BackendFailure("cancelled", "the backend was shut down"), 0.0 if hung else timeout)
        self._run_ready()

    # ------------------------------------------------------------------------------------------- requests

    def submit(self, op: str, params: dict, arrays: dict[str, np.ndarray] | None = None) -> Future:
        """Send a request; never blocks. A request that cannot be sent comes back as an already-failed future.
        The add-on's ops go through submit_request (typed); this raw form is for echo and tests."""
        return self._send(op, params, arrays, self.request_timeout)

    def submit_request(self, request: payloads.Payload) -> Future:
        """submit() for a typed request (backend/payloads.py): its op, params and arrays."""
        return self._send_payload(request, self.request_timeout)

    def cancel(self, future: Future) -> None:
        """Abandon `future` now: it fails with "cancelled" at once (its callbacks run here) and the backend is
        asked to stop its op; a late reply is ignored. A finished future is left as it is."""
        if future.done():
            return
        self._pending.pop(future.request_id, None)
        if self.alive():
            self._send_payload(payloads.CancelRequest(future.request_id), self.request_timeout)
        self._ready += future._settle(failure=BackendFailure("cancelled", f"{future.op} was cancelled"))
        self._run_ready()

    def pump(self, max_wait: float = 0.0) -> int:
        """Apply arrived frames, death and timeouts to futures and run done-callbacks; waits at most
        `max_wait` seconds for the first event. Returns how many events it handled."""
        handled = 0
        try:
            event = self._events.get(timeout=max_wait) if max_wait > 0 else self._events.get_nowait()
            while True:
                handled += self._apply(*event)
                event = self._events.get_nowait()
        except queue.Empty:
            pass
        now = time.monotonic()
        if self._eof_at is not None and self._stopped is None:
            self._report_death(now)
        handled += self._expire(now)
        self._run_ready()
        return handled

    def wait(self, future: Future, timeout: float) -> tuple[dict, dict[str, np.ndarray]]:
        """Pump until `future` is done (for tests and scripts; the add-on never blocks like this)."""
        deadline = time.monotonic() + timeout
        while not future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendFailure("timeout", f"{future.op} (request {future.request_id}) did not finish "
                                                f"within {timeout:g} s")
            self.pump(max_wait=min(left, 0.1))
        return future.result()

    # ------------------------------------------------------------------------------------------- internals

    def _send_payload(self, request: payloads.Payload, timeout: float) -> Future:
        return self._send(request.OP, request.to_dict(), request.to_arrays() or None, timeout)

    def _send(self, op: str, params: dict, arrays: dict | None, timeout: float) -> Future:
        future = Future(next(self._ids), op, time.monotonic() + timeout)
        if not self.alive():
            future._settle(failure=self._not_running())
            return future
        try:  # copied into one buffer now: the caller may reuse its arrays at once
            frame = wire.encode_bytes(wire.request(future.request_id, op, params), arrays)
        except wire.ProtocolError as exc:
            future._settle(failure=BackendFailure("invalid_input", f"cannot send {op}: {exc}"))
            return future
        if not self._pending:
            self._busy_since = time.monotonic()
        self._pending[future.request_id] = future
        self._outbox.put(frame)
        return future

    def _not_running(self) -> BackendFailure:
        if self._stopped is None:  # the process ended but pump() has not seen it yet
            self._report_death(time.monotonic(), now_or_never=True)
        assert self._stopped is not None
        return self._stopped

    def _apply(self, gen: int, kind: str, payload: Any) -> int:
        if gen != self._generation or self._stopped is not None:
            return 0
        if kind == "frame":
            self._apply_frame(payload)
        elif kind == "bad_frame":
            self._stop(BackendFailure("protocol_error", f"the backend sent an unreadable frame ({payload}); "
                                                        "it was stopped"), timeout=0.2)
        elif kind == "eof":
            self._eof_at = time.monotonic()
            self._report_death(self._eof_at)
        # "write_failed": the process is going away; its end of stdout follows and is reported then
        return 1

    def _apply_frame(self, msg: wire.Message) -> None:
        h = msg.header
        if msg.kind == "progress":
            future = self._pending.get(h["id"])
            if future is not None:
                future.progress, future.message = h["fraction"], h["message"]
            return
        if msg.kind != "reply":
            self._stop(BackendFailure("protocol_error", f"the backend sent a {msg.kind} frame; it was stopped"))
            return
        future = self._pending.pop(h["id"], None) if h["id"] is not None else None
        failure = None if h["ok"] else BackendFailure(h["error"]["code"], h["error"]["message"])
        if future is None:  # a reply to a timed-out request, or to a frame the server could not attribute
            if failure is not None and h["id"] is None:
                self.last_error = failure
                print(f"[imhead-client] backend refused a frame: {failure.message}", file=sys.stderr)
            return
        if future.request_id == self._handshake_id:
            self._apply_handshake(future, h.get("params"), failure)
            return
        if failure is None:
            failure = check_reply(future.op, h["params"], msg.arrays)
        self._ready += future._settle(outcome=(h["params"], msg.arrays) if failure is None else None,
                                      failure=failure)

    def _apply_handshake(self, future: Future, params: dict | None, failure: BackendFailure | None) -> None:
        if failure is None:
            try:
                self.handshake = parse_handshake(params or {})
            except BackendFailure as exc:
                failure = exc
        if failure is None:
            self._ready += future._settle(outcome=(params, {}))
            return
        # Without a handshake the backend is unusable: stop it and let every request say why.
        self._ready += future._settle(failure=failure)
        self._stop(BackendFailure(failure.code, f"backend handshake failed: {failure.message}"))

    def _expire(self, now: float) -> int:
        late = [f for f in self._pending.values() if now > f._deadline]
        for future in late:
            if future.request_id == self._handshake_id:
                self._stop(BackendFailure("startup_timeout", f"the backend did not answer the handshake within "
                                                             f"{self.startup_timeout:g} s"), timeout=0.2)
                return len(late)
            del self._pending[future.request_id]
            self._ready += future._settle(failure=BackendFailure(
                "timeout", f"{future.op} did not finish within {self.request_timeout:g} s"))
            if future.op not in ("cancel", "shutdown") and self.alive():
                self._send_payload(payloads.CancelRequest(future.request_id), self.request_timeout)
        return len(late)

    def _report_death(self, now: float, now_or_never: bool = False) -> None:
        """After end of stdout: fail everything with the exit status and the last stderr lines once both are in,
        polling from pump() rather than waiting (EOF_GRACE_S at most, or at once with `now_or_never`)."""
        proc = self._proc
        assert proc is not None
        status = proc.poll()
        if status is not None and now_or_never:
            self._threads[2].join(0.03)  # the process is gone: its last stderr lines are a few ms away
        complete = status is not None and not self._threads[2].is_alive()
        if not complete and not now_or_never and now - (self._eof_at or now) < EOF_GRACE_S:
            return
        self._stop(BackendFailure("backend_died", death_message(status, self._stderr_tail)), timeout=0.0)

    def _stop(self, reason: BackendFailure, pending_failure: BackendFailure | None = None,
              timeout: float = KILL_GRACE_S) -> None:
        """Fail every open request and make later submits fail with `reason`, at once; a reaper thread gives the
        process `timeout` seconds to exit, then SIGKILLs it."""
        self._stopped = reason
        if reason.code != "not_running":
            self.last_error = reason
        proc = self._proc
        if proc is not None:
            self._outbox.put(None)  # the writer closes stdin: a healthy backend exits on end of input
            threading.Thread(target=reap_process, args=(proc, timeout, list(self._threads)), daemon=True).start()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            self._ready += future._settle(failure=pending_failure or reason)

    def _reap(self) -> None:
        """Forget a previous process before starting another (its reaper thread finishes it)."""
        if self._proc is not None and self._stopped is None:
            self._report_death(time.monotonic(), now_or_never=True)
        self._proc, self._threads = None, []

    def _run_ready(self) -> None:
        ready, self._ready = self._ready, []
        for callback in ready:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - one bad callback must not starve the others
                print(f"[imhead-client] a done-callback failed: {exc!r}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------- threads

    def _read_frames(self, gen: int, stream, events: queue.Queue) -> None:
        try:
            while (msg := wire.read_frame(stream)) is not None:
                if gen == self._generation:
                    self._heard_at = time.monotonic()
                events.put((gen, "frame", msg))
        except wire.ProtocolError as exc:
            events.put((gen, "bad_frame", str(exc)))
        except (OSError, ValueError):
            pass  # the pipe was closed under us during a restart
        events.put((gen, "eof", None))
