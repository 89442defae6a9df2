"""Client for the backend subprocess (`python -m backend serve`, docs/protocol.md) — bpy-free, numpy only.

An actor in the style of Dream Textures' generator_process: `submit()` hands an encoded frame to a writer
thread and returns a `Future` at once; a reader thread decodes stdout frames into a queue; `pump()` applies
them on the caller's thread (Blender's main thread), so futures change state and done-callbacks run only
there. `pump()` is callable directly because timers never fire when Blender runs as a module.
"""

from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeAlias

import numpy as np

# The codec (wire.py) and the ops' typed params (payloads.py, replies.py) are the backend's own, numpy-only modules
if (Path(__file__).resolve().parent / "backend" / "wire.py").is_file():
    # inside the built extension, backend/ is part of the add-on package (build.py copies it in; not in the tree)
    from .backend import errors, payloads, replies, wire  # type: ignore[import-not-found]
else:
    from backend import errors, payloads, replies, wire  # source checkout: backend/ sits beside imhead_blender/

STDERR_TAIL_LINES = 12
KILL_GRACE_S = 2.0  # a backend told to stop gets this long before SIGKILL (a hung one gets none)
# The server repeats each open request's progress every second (its heartbeat); this much silence while a request
# is open means the backend is hung (stopped, deadlocked, or swapping), reported by hung() and the panel.
HUNG_AFTER_S = 6.0
EOF_GRACE_S = 2.0  # after end of stdout, how long pump() waits for the exit status and last stderr lines
ERROR_PREFIX = "[imhead-backend] error:"  # a start-up failure's one-line reason on stderr


class BackendFailure(Exception):
    """An error reply from the backend, or the backend died, timed out or is not running."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"BackendFailure({self.code!r}, {self.message!r})"


Handshake: TypeAlias = replies.HandshakeReply  # the handshake reply's fields; `info` holds every key sent


class Future:
    """One request's outcome. State changes only inside `pump()` (or `shutdown()`), on the caller's thread."""

    def __init__(self, request_id: int, op: str, deadline: float):
        self.request_id = request_id
        self.op = op
        self.progress = 0.0
        self.message = ""
        self._deadline = deadline
        self._outcome: tuple[dict, dict[str, np.ndarray]] | None = None
        self._failure: BackendFailure | None = None
        self._callbacks: list[Callable[[Future], None]] = []

    def done(self) -> bool:
        return self._outcome is not None or self._failure is not None

    def result(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(params, arrays) of the reply. Never blocks: raises BackendFailure("not_done") if not done."""
        if self._failure is not None:
            raise self._failure
        if self._outcome is None:
            raise BackendFailure("not_done", f"request {self.request_id} ({self.op}) has not finished; pump() "
                                             "until done() is true")
        return self._outcome

    def add_done_callback(self, fn: Callable[[Future], None]) -> None:
        """`fn(future)` runs inside the pump() that finishes it, or at once if it is already done."""
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def _settle(self, outcome=None, failure: BackendFailure | None = None) -> list[Callable[[], None]]:
        """Record the outcome; returns the callbacks to run (after all state is consistent)."""
        if self.done():
            return []
        self._outcome, self._failure = outcome, failure
        if outcome is not None:
            self.progress = 1.0
        callbacks, self._callbacks = self._callbacks, []
        return [partial(fn, self) for fn in callbacks]


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
        if not (Path(self.backend_root) / "backend" / "__main__.py").is_file():
            self._stopped = self.last_error = BackendFailure(
                "not_running", f"{self.backend_root} does not contain the imhead backend (backend/__main__.py)")
            raise self._stopped
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        env.update(self.env)
        env["PYTHONPATH"] = self.backend_root
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # Ctrl+C in Blender's terminal must not kill the backend
        try:
            proc = subprocess.Popen([self.python, "-m", "backend", "serve"], cwd=self.backend_root, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
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
            threading.Thread(target=self._write_frames, args=(gen, proc.stdin, self._outbox, self._events),
                             daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
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
            failure = _check_reply(future.op, h["params"], msg.arrays)
        self._ready += future._settle(outcome=(h["params"], msg.arrays) if failure is None else None,
                                      failure=failure)

    def _apply_handshake(self, future: Future, params: dict | None, failure: BackendFailure | None) -> None:
        if failure is None:
            try:
                self.handshake = _parse_handshake(params or {})
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
        tail = "\n".join(self._stderr_tail)
        error = _last_error_line(self._stderr_tail, failed=status is not None and status > 0)
        if status is None:
            how = "closed its output but kept running, so it was killed"
        else:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        message = f"the imhead backend {how}" + (f": {error}" if error else "")
        message += f"; its last output:\n{tail}" if tail else " (no output)"
        self._stop(BackendFailure("backend_died", message), timeout=0.0)

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
            threading.Thread(target=_reap_process, args=(proc, timeout, list(self._threads)), daemon=True).start()
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

    @staticmethod
    def _write_frames(gen: int, stream, outbox: queue.Queue, events: queue.Queue) -> None:
        try:
            while (frame := outbox.get()) is not None:
                stream.write(frame)
                stream.flush()
            stream.close()
        except (OSError, ValueError) as exc:
            events.put((gen, "write_failed", str(exc)))

    def _read_stderr(self, stream) -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip()
                self._stderr_tail.append(line)
                print(line, file=sys.stderr)
        except (OSError, ValueError):
            pass


def _reap_process(proc: subprocess.Popen, grace: float, threads: list[threading.Thread]) -> None:
    """Reaper thread: SIGKILL after `grace` seconds, then close the pipes once their threads are done."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()  # works on a stopped (SIGSTOP) process too
        proc.wait()
    for t in threads:
        if t is not threading.current_thread():
            t.join(5.0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except (OSError, ValueError):
            pass


def _last_error_line(lines, failed: bool) -> str:
    """The backend's own explanation of a failed start (`[imhead-backend] error: ...`); else, when it exited with
    an error status, its last line (a traceback's exception, a launcher's message)."""
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last if failed else ""


def _check_reply(op: str, params: dict, arrays: dict[str, np.ndarray]) -> BackendFailure | None:
    """A reply without the fields its op promises (backend/replies.py) fails its request, not the callback."""
    kind = replies.REPLIES.get(op)
    try:
        if kind is not None:
            kind.from_dict(params, arrays)
    except errors.InvalidInput as exc:
        return BackendFailure("protocol_error", f"the backend's {op} reply is malformed: {exc}")
    return None


def _parse_handshake(p: dict) -> Handshake:
    if p.get("protocol") != wire.PROTOCOL_VERSION:
        raise BackendFailure("protocol_mismatch", f"the backend speaks protocol {p.get('protocol')!r}, this add-on "
                                                  f"speaks {wire.PROTOCOL_VERSION}")
    try:
        return replies.HandshakeReply.from_dict(p)
    except errors.InvalidInput as exc:
        raise BackendFailure("protocol_error", str(exc)) from None
