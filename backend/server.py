"""stdio server: frames in on stdin, frames out on stdout (docs/protocol.md).

The main thread only reads and routes frames, so `cancel` and `shutdown` are seen while an op runs; ops run on
one worker thread, one at a time, in arrival order. The engine (`backend.engine.session.Session`) is built on
the first handshake, not at start, so a start-up failure (missing weights, no CUDA) reaches the client as a
structured error reply instead of a dead process. Right after that handshake, if no request is waiting yet,
the worker runs the engine's `warm_up()`: the add-on starts the backend when its panel is first shown, so the
first head's one-off costs are paid before the user asks for it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Protocol, TextIO

import numpy as np

from . import __version__, wire
from .errors import BackendError, Cancelled, InvalidInput
from .payloads import CancelRequest, HandshakeRequest
from .replies import CancelReply, HandshakeReply

SESSION_OPS = ("generate", "deform", "edit", "fit", "fit_capture")
# Handled by the server itself; "echo" returns its input unchanged (connection checks, transfer timing).
CONTROL_OPS = ("handshake", "cancel", "shutdown", "echo")
EXIT_OK = 0
EXIT_BROKEN_STREAM = 3
PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress frames per second per request, unless the message changes
HEARTBEAT_S = 0.8  # every open request hears from the server at least this often (the client's liveness check)


def take_stdout() -> BinaryIO:
    """Return a private handle on the real stdout for frames; from here on fd 1 and sys.stdout both go to
    stderr, so a stray print (from Python, or from C++ inside torch) can never corrupt the frame stream."""
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    if sys.stdin.isatty():
        print("[imhead-backend] this server speaks binary frames on stdin/stdout (docs/protocol.md); it is "
              "meant to be started by the Blender add-on", file=sys.stderr, flush=True)
    return frames


class ResourceGuard(Protocol):
    """Checks a request against the machine before it runs, and gives memory back after it."""

    def check(self, op: str, params: dict[str, Any]) -> None: ...  # raises BackendError to refuse

    def release(self) -> None: ...


@dataclass
class _Job:
    id: int
    op: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]
    cancel: threading.Event = field(default_factory=threading.Event)
    # the last progress sent (the heartbeat repeats it), and when
    fraction: float = 0.0
    message: str = "queued"
    sent_at: float = field(default_factory=time.monotonic)


class _Progress:
    """What an op sees (the `Progress` protocol in docs/architecture.md)."""

    def __init__(self, server: Server, job: _Job):
        self._server, self._job = server, job
        self._last_sent = -math.inf
        self._last_message: str | None = None

    def report(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self._last_sent < PROGRESS_INTERVAL_S and message == self._last_message:
            return
        fraction = float(fraction)
        fraction = 0.0 if math.isnan(fraction) else min(max(fraction, 0.0), 1.0)
        self._last_sent, self._last_message = now, message
        self._server.send_progress(self._job, fraction, str(message))

    @property
    def cancelled(self) -> bool:
        return self._job.cancel.is_set()


class Server:
    """`backend_factory` builds the object whose methods `ops` name: `info() -> dict` plus
    `op(params, arrays, progress) -> (params, arrays)`. The product passes the engine Session; protocol tests
    pass their own op table."""

    def __init__(self, backend_factory: Callable[[], Any], ops: Iterable[str], instream: BinaryIO,
                 outstream: BinaryIO, log: TextIO = sys.stderr, shutdown_grace_s: float = 10.0,
                 guard: ResourceGuard | None = None):
        self._factory = backend_factory
        self._ops = tuple(ops)
        clash = set(self._ops) & set(CONTROL_OPS)
        if clash:
            raise ValueError(f"ops {sorted(clash)} are reserved by the server")
        self._in, self._out, self._log = instream, outstream, log
        self._grace = shutdown_grace_s
        self._guard = guard
        self._backend: Any = None
        self._handshake_ok = False
        self._handshake_refusal = "send a handshake request first"
        self._write_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}  # queued or running, by request id
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="imhead-worker", daemon=True)
        self._heartbeat = threading.Thread(target=self._beat, name="imhead-heartbeat", daemon=True)
        # "pending" after the first good handshake: the backend's warm_up() runs if no request is waiting by then
        self._warm_up_state = "none"

    # ------------------------------------------------------------------------------------------ main thread

    def serve(self) -> int:
        """Serve until `shutdown`, end of stdin, or a broken stream; returns the process exit status."""
        self.log(f"imhead backend {__version__} ({os.path.dirname(os.path.abspath(__file__))}), protocol "
                 f"{wire.PROTOCOL_VERSION}, ready")
        self._worker.start()
        self._heartbeat.start()
        while True:
            try:
                msg = wire.read_frame(self._in)
            except OSError as exc:  # stdin itself failed: as good as the client going away
                self.log(f"cannot read the input: {exc}; exiting")
                self._stop(reason="the input failed")
                return EXIT_OK
            except wire.ProtocolError as exc:
                self.log(f"bad frame: {exc}")
                self.send(wire.reply_error(exc.request_id, exc.code, str(exc)))
                if exc.fatal:
                    self.log("the input stream cannot be resynchronised; exiting")
                    self._stop(reason="the input stream broke")
                    return EXIT_BROKEN_STREAM
                continue
            if msg is None:
                self.log("end of input; exiting")
                self._stop(reason="the client went away")
                return EXIT_OK
            if msg.kind != "request":
                self.send(wire.reply_error(msg.id, "protocol_error", f"the server accepts requests, not {msg.kind}"))
                continue
            if self._route(msg) == "shutdown":
                return EXIT_OK

    def _route(self, msg: wire.Message) -> str | None:
        rid, op, params = msg.id, msg.header["op"], msg.header["params"]
        assert rid is not None  # a request's id is validated by the codec
        with self._cv:
            duplicate = rid in self._jobs
        if duplicate:
            self.send(wire.reply_error(rid, "duplicate_id", f"request id {rid} is already queued or running"))
        elif op == "handshake":
            self._handshake(rid, params)
        elif op == "shutdown":
            self._stop(reason="the backend is shutting down")
            self.send(wire.reply_ok(rid, {}))
            self.log("shutdown requested; exiting")
            return "shutdown"
        elif not self._handshake_ok:
            self.send(wire.reply_error(rid, "handshake_required", f"no successful handshake: "
                                                                  f"{self._handshake_refusal}"))
        elif op == "cancel":
            self._cancel(rid, params)
        elif op == "echo" or op in self._ops:
            self._enqueue(_Job(rid, op, params, msg.arrays))
        else:
            self.send(wire.reply_error(rid, "unknown_op", f"unknown op {op!r}; this backend serves "
                                                          f"{', '.join(self._ops + CONTROL_OPS)}"))
        return None

    def _handshake(self, rid: int, params: dict[str, Any]) -> None:
        theirs = HandshakeRequest.from_dict(params).protocol
        if theirs != wire.PROTOCOL_VERSION:
            self._handshake_ok = False
            self._handshake_refusal = (f"the client speaks imhead protocol {theirs!r} but this backend "
                                       f"({__version__}) speaks protocol {wire.PROTOCOL_VERSION}; install the "
                                       "add-on and the backend from the same imhead release")
            self.send(wire.reply_error(rid, "protocol_mismatch", self._handshake_refusal))
            return
        self._handshake_ok = True
        self._enqueue(_Job(rid, "handshake", params, {}))

    def _cancel(self, rid: int, params: dict[str, Any]) -> None:
        try:
            target = CancelRequest.from_dict(params).target
        except InvalidInput as exc:
            self.send(wire.reply_error(rid, exc.code, str(exc)))
            return
        with self._cv:
            job = self._jobs.get(target)
            queued = job is not None and job in self._queue
            if queued and job is not None:
                self._queue.remove(job)
                del self._jobs[target]
            if job is not None:
                job.cancel.set()
        if queued:
            self.send(wire.reply_error(target, Cancelled.code, "cancelled before it started"))
        state = "queued" if queued else "running" if job is not None else "unknown"
        self.send(wire.reply_ok(rid, CancelReply(target, state).to_dict()))

    def _enqueue(self, job: _Job) -> None:
        with self._cv:
            self._jobs[job.id] = job
            self._queue.append(job)
            self._cv.notify_all()  # the heartbeat waits on the same condition

    def _stop(self, reason: str) -> None:
        """Cancel everything and let the worker finish its current op (bounded by the grace period)."""
        with self._cv:
            dropped = list(self._queue)
            self._queue.clear()
            for job in self._jobs.values():
                job.cancel.set()
            for job in dropped:
                del self._jobs[job.id]
            self._stopping = True
            self._cv.notify_all()
        for job in dropped:
            self.send(wire.reply_error(job.id, Cancelled.code, f"cancelled: {reason}"))
        self._worker.join(self._grace)
        if self._worker.is_alive():
            self.log(f"the running op did not stop within {self._grace:g} s; leaving it behind")

    # ------------------------------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while True:
            job: _Job | None
            with self._cv:
                while not self._queue and not self._stopping and self._warm_up_state != "pending":
                    self._cv.wait()
                if self._queue:
                    job = self._queue.popleft()
                    if job.op != "handshake" and self._warm_up_state == "pending":
                        self._warm_up_state = "done"  # a request came first: it pays the one-off costs itself
                elif self._stopping:
                    return
                else:
                    job, self._warm_up_state = None, "done"
            if job is None:
                self._warm_up()
                continue
            job.message = f"running {job.op}"
            header, arrays = self._run(job)
            if self._guard is not None:
                self._guard.release()
            with self._cv:
                self._jobs.pop(job.id, None)
                if job.op == "handshake" and header.get("ok") and self._warm_up_state == "none":
                    self._warm_up_state = "pending" if callable(getattr(self._backend, "warm_up", None)) else "done"
            self._send_reply(job, header, arrays)

    def _beat(self) -> None:
        """Repeat each open request's last progress when nothing was sent for it for HEARTBEAT_S, so the client
        can tell a busy server from a hung one (docs/protocol.md, "Liveness")."""
        while True:
            with self._cv:
                if self._stopping:
                    return
                self._cv.wait(HEARTBEAT_S / 8)
                now = time.monotonic()
                for job in [j for j in self._jobs.values() if now - j.sent_at >= HEARTBEAT_S]:
                    # under the lock: a job's reply (sent after it leaves _jobs) never precedes its heartbeat
                    self.send_progress(job)

    def _warm_up(self) -> None:
        """The backend's warm_up() (one-off costs of a first request: imports, first allocations, GPU kernel
        compilation), run once after the handshake while no request waits; a request arriving meanwhile waits
        for it. A failure is only logged: the requests that follow report their own errors."""
        t = time.perf_counter()
        try:
            self._backend.warm_up()
        except BaseException as exc:  # noqa: BLE001 - the worker thread must survive it
            self.log(f"warm-up failed: {type(exc).__name__}: {exc}")
            return
        self.log(f"warm-up done in {time.perf_counter() - t:.2f} s")

    def _run(self, job: _Job) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            if job.op == "echo":
                return wire.reply_ok(job.id, job.params), job.arrays
            if self._backend is None:
                self._backend = self._factory()  # a failure here is retried by the next request
            if job.op == "handshake":
                return wire.reply_ok(job.id, self._handshake_info()), {}
            op = getattr(self._backend, job.op, None)
            if not callable(op):
                raise BackendError(f"this backend ({__version__}) does not serve {job.op!r}", code="unknown_op")
            if self._guard is not None:
                self._guard.check(job.op, job.params)
            params, arrays = op(job.params, job.arrays, _Progress(self, job))
            if not isinstance(params, dict) or not isinstance(arrays, dict):
                raise TypeError(f"op {job.op} returned {type(params).__name__}, {type(arrays).__name__}; "
                                "expected (dict, dict)")
            return wire.reply_ok(job.id, params), arrays
        except BackendError as exc:
            return wire.reply_error(job.id, exc.code, str(exc)), {}
        except BaseException as exc:  # noqa: BLE001 - even SystemExit in an op must not kill the worker thread
            return self._internal_error(job, exc), {}

    def _handshake_info(self) -> dict[str, Any]:
        try:
            reply = HandshakeReply.from_dict({**self._backend.info(), "protocol": wire.PROTOCOL_VERSION})
        except InvalidInput as exc:  # the backend's fault, not the client's: an internal_error
            raise TypeError(f"Session.info(): {exc}") from None
        return reply.to_dict()

    def _send_reply(self, job: _Job, header: dict[str, Any], arrays: dict[str, Any]) -> None:
        try:
            frame = wire.encode(header, arrays)
        except wire.ProtocolError as exc:  # the op returned something the wire cannot carry
            frame = wire.encode(self._internal_error(job, exc))
        self._write(frame)

    def _internal_error(self, job: _Job, exc: BaseException) -> dict[str, Any]:
        self.log(f"internal error in request {job.id} ({job.op}):\n"
                 + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        return wire.reply_error(job.id, "internal_error", f"{job.op} failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ both threads

    def send(self, header: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
        self._write(wire.encode(header, arrays))

    def send_progress(self, job: _Job, fraction: float | None = None, message: str | None = None) -> None:
        """Send (and remember) new progress, or repeat the last one (the heartbeat). Under the write lock, so a
        repeat can never overtake a newer fraction."""
        with self._write_lock:
            if fraction is not None and message is not None:
                job.fraction, job.message = fraction, message
            job.sent_at = time.monotonic()
            self._write_locked(wire.encode(wire.progress(job.id, job.fraction, job.message)))

    def _write(self, chunks: list) -> None:
        with self._write_lock:
            self._write_locked(chunks)

    def _write_locked(self, chunks: list) -> None:
        try:
            for chunk in chunks:
                self._out.write(chunk)
            self._out.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:  # the client is gone; stdin EOF follows
            self.log(f"cannot write to the client: {exc}")

    def log(self, text: str) -> None:
        print(f"[imhead-backend] {text}", file=self._log, flush=True)
