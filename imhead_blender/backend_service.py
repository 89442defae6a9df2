"""The one backend client per Blender session, the jobs in flight, and `pump_backend()`.

Operators only submit; replies are applied on Blender's main thread by `pump_backend()`, which a
`bpy.app.timers` callback calls. Timers never fire when Blender runs as the `bpy` module, so scripts and
tests call `pump_backend()` (or `drain()`, a pump loop with a timeout) directly.
"""

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import bpy
import numpy as np

from . import expressions, preferences
from .client import BackendClient, BackendFailure, Future, payloads

OnSuccess = Callable[[dict, dict[str, np.ndarray]], None]
OnFailure = Callable[[BackendFailure], None]

TIMER_BUSY_S = 0.05
TIMER_IDLE_S = 0.5
# A fit or a fine mesh on a busy laptop CPU can take many minutes; the panel's Cancel is the usual way out.
REQUEST_TIMEOUT_S = 1800.0


@dataclass
class Job:
    future: Future
    label: str
    object_name: str | None
    on_success: OnSuccess | None
    on_failure: OnFailure | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> int:
        return self.future.request_id


@dataclass
class _State:
    client: BackendClient | None = None
    python: str = ""
    jobs: list[Job] = field(default_factory=list)
    last_error: str = ""
    handshake_checked: bool = False
    prestarted: bool = False  # prestart() is tried once per Blender session
    crashes: list[float] = field(default_factory=list)  # monotonic times of automatic restarts
    died_at: float | None = None  # when the running client was first seen dead
    notice: str = ""  # shown with READY: the last automatic restart


_state = _State()
# Called after every successful start (first start, Restart): resend what could not be sent while it was down.
_ready_listeners: list[Callable[[], None]] = []


def add_ready_listener(fn: Callable[[], None]) -> None:
    if fn not in _ready_listeners:
        _ready_listeners.append(fn)


class BackendUnavailable(RuntimeError):
    """The backend cannot take requests (not configured, or its process died); the message says what to do."""


# --- lifecycle -------------------------------------------------------------------------------------------

def ensure_started() -> BackendClient:
    """Start the backend on first use. A process that died is restarted by pump_backend() after a backoff
    (auto_restart); meanwhile requests are refused with the reason, so a crash is never silent."""
    client = _state.client
    if client is not None:
        if client.alive():
            return client
        crashed = client.last_error is not None and client.last_error.code == "backend_died"
        plan = f"{_restart_plan()}, or press 'Restart Backend'." if crashed else "Press 'Restart Backend'."
        raise BackendUnavailable(f"The imHead backend stopped ({_death_reason(client)}). {plan}")
    return _start()


# Automatic restarts after a crash: at most RESTARTS_PER_MINUTE in any 60 s, the n-th waiting BACKOFF_S[n].
RESTARTS_PER_MINUTE = 3
BACKOFF_S = (1.0, 4.0, 10.0)


def _restart_plan() -> str:
    now = time.monotonic()
    recent = [t for t in _state.crashes if now - t < 60.0]
    if len(recent) >= RESTARTS_PER_MINUTE:
        return f"It crashed {len(recent)} times within a minute, so it is not restarted automatically: fix the " \
               "cause (see the console)"
    wait = BACKOFF_S[len(recent)] - (now - (_state.died_at or now))
    return f"It restarts automatically in {max(wait, 0.0):.0f} s"


def auto_restart() -> None:
    """pump_backend() calls this while the client is dead: restart once the backoff has passed, unless that
    would be the fourth restart within a minute. Every step is written where the panel shows it."""
    client = _state.client
    if client is None or client.alive() or client.last_error is None or client.last_error.code != "backend_died":
        return  # not started, running, or stopped on purpose / by a failed handshake (a restart would not help)
    now = time.monotonic()
    if _state.died_at is None:
        _state.died_at = now
    _state.crashes = [t for t in _state.crashes if now - t < 60.0]
    reason = _death_reason(client)
    if len(_state.crashes) >= RESTARTS_PER_MINUTE or now - _state.died_at < BACKOFF_S[len(_state.crashes)]:
        _state.last_error = f"The imHead backend stopped ({reason}). {_restart_plan()}."
        return
    _state.crashes.append(now)
    count = len(_state.crashes)
    print(f"[imhead] backend stopped ({reason}); automatic restart {count} of {RESTARTS_PER_MINUTE} this minute",
          file=sys.stderr)
    _state.client = None  # not shutdown(): this runs inside the timer that shutdown() would unregister
    try:
        client.shutdown(timeout=1.0)
    except BackendFailure:
        pass  # it is gone already
    try:
        _start()
    except BackendUnavailable:
        pass  # _start recorded why in last_error
    _state.notice = f"Backend restarted automatically after it stopped ({reason}); {count} of " \
                    f"{RESTARTS_PER_MINUTE} restarts allowed per minute"


def prestart() -> None:
    """Start the backend ahead of the first request, once per Blender session (the main panel calls this when it
    is drawn and the preference allows it): its torch import, model load and warm-up (the server's, after the
    handshake) then overlap the user's first look at the panel. Never raises: a failure shows in the panel's
    status like any other."""
    if _state.prestarted or _state.client is not None:
        return
    _state.prestarted = True
    try:
        _start()
    except BackendUnavailable:
        pass  # _start recorded why in last_error


def _death_reason(client: BackendClient) -> str:
    failure = client.stop_reason()
    if failure is None or failure.code == "not_running":
        failure = client.last_error or failure
    if failure is None:
        return "its process exited"
    return failure.message.partition("; its last output")[0].splitlines()[0]


def _start() -> BackendClient:
    try:
        python, _source = preferences.resolve_python(preferences.get_preferences().python_path)
        root = preferences.backend_root()
    except RuntimeError as exc:
        _state.last_error = str(exc)
        raise BackendUnavailable(str(exc)) from exc
    client = BackendClient(python, str(root), request_timeout=REQUEST_TIMEOUT_S,
                           env=preferences.backend_env(preferences.get_preferences()))
    try:
        client.start()
    except BackendFailure as exc:
        _state.last_error = exc.message
        raise BackendUnavailable(exc.message) from exc
    _state.client, _state.python = client, python
    _state.last_error, _state.handshake_checked, _state.died_at = "", False, None
    _ensure_timer()
    for listener in _ready_listeners:
        try:
            listener()
        except BackendUnavailable:
            break
        except Exception:  # one listener's bug must not stop the start
            traceback.print_exc()
    return client


def restart() -> BackendClient:
    shutdown()
    _state.crashes, _state.notice = [], ""
    return _start()  # the ready listeners resend what the old process's end cut off


def restart_if_running() -> None:
    """A setting the process reads at start changed (the device): apply it now if a backend runs."""
    if _state.client is not None:
        try:
            restart()
        except BackendUnavailable:
            pass  # shown in the panel's status

def shutdown() -> None:
    """Stop the process and forget its jobs (used by Restart and unregister)."""
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    client, _state.client = _state.client, None
    _state.jobs.clear()
    if client is not None:
        try:
            client.shutdown()  # returns at once; a reaper thread SIGKILLs it after a short grace
        except BackendFailure:
            pass  # it is going away either way


def client() -> BackendClient | None:
    return _state.client


# --- requests --------------------------------------------------------------------------------------------

def submit(request: payloads.Payload, *, label: str, on_success: OnSuccess, on_failure: OnFailure | None = None,
           object_name: str | None = None) -> Job:
    """Send a typed request (backend/payloads.py); never blocks. Callbacks run later on the main thread inside
    pump_backend()."""
    client = ensure_started()
    future = client.submit_request(request)
    job = Job(future, label, object_name, on_success, on_failure)
    _state.jobs.append(job)
    future.add_done_callback(lambda _f: _finish(job))
    _ensure_timer()
    return job


def _finish(job: Job) -> None:
    if job in _state.jobs:
        _state.jobs.remove(job)
    try:
        params, arrays = job.future.result()
    except BackendFailure as exc:
        if exc.code != "cancelled":
            _state.last_error = f"{job.label}: {exc.message}"
            print(f"[imhead] {job.label} failed ({exc.code}): {exc.message}", file=sys.stderr)
        if job.on_failure is not None:
            job.on_failure(exc)
        _redraw()
        return
    if job.on_success is None:  # dropped by cancel_all()
        return
    try:
        job.on_success(params, arrays)
    except Exception as exc:  # a bad reply must not kill the timer; show it instead
        traceback.print_exc()
        _state.last_error = f"{job.label}: could not apply the reply: {exc}"
    _redraw()


def jobs(object_name: str | None = None) -> list[Job]:
    return [j for j in _state.jobs if object_name is None or j.object_name == object_name]


def cancel(request_id: int) -> bool:
    for job in _state.jobs:
        if job.request_id == request_id and _state.client is not None:
            _state.client.cancel(job.future)
            return True
    return False


def cancel_all() -> None:
    """Cancel every job and drop its callbacks (a new file is being loaded: replies would address objects
    of the old one by name)."""
    for job in list(_state.jobs):
        job.on_success = job.on_failure = None
        if _state.client is not None:
            _state.client.cancel(job.future)


def pump_backend() -> int:
    """Apply whatever the backend sent (progress, replies, death). Cheap when idle; main thread only."""
    client = _state.client
    if client is None:
        return 0
    handled = client.pump()
    if client.handshake is not None and not _state.handshake_checked:
        _state.handshake_checked = True
        _check_handshake(client.handshake.info)
    if not client.alive():
        if not _state.last_error:
            _state.last_error = _death_reason(client)
        auto_restart()
    if handled:
        _redraw()
    return handled


def drain(timeout: float, until: Callable[[], bool] | None = None) -> None:
    """Pump until no job is in flight (or `until()` holds) — for scripts and tests, where timers never fire.
    Raises TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (until is None and _state.jobs) or (until is not None and not until()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend jobs still running after {timeout:.0f} s: "
                               + ", ".join(j.label for j in _state.jobs))
        if pump_backend() == 0:
            time.sleep(0.01)


# --- status ----------------------------------------------------------------------------------------------

def _check_handshake(info: dict) -> None:
    names = info.get("expressions")
    if names is not None and tuple(names) != expressions.EXPRESSION_NAMES:
        _state.last_error = ("backend expression list differs from the add-on's; "
                             "the extension and its backend come from different builds")


def handshake():
    return None if _state.client is None else _state.client.handshake


def regions() -> list[dict]:
    """[{id, name, mirror}] from the handshake (empty until it arrived)."""
    hs = handshake()
    return list(hs.info.get("regions", [])) if hs is not None else []


def status() -> tuple[str, str]:
    """(state, text) with state in NOT_STARTED, STARTING, READY, HUNG, ERROR."""
    client = _state.client
    if client is None:
        return ("ERROR", _state.last_error) if _state.last_error else ("NOT_STARTED", "Backend not started")
    if not client.alive():
        return "ERROR", _state.last_error or _death_reason(client)
    if client.hung():
        return "HUNG", (f"The backend has not answered for {client.silent_for():.0f} s; it may be stuck. Cancel "
                        "the job or press 'Restart Backend'.")
    if client.handshake is None:
        return "STARTING", f"Starting backend ({_state.python})"
    return "READY", _state.last_error


def report_problem(text: str) -> None:
    """A reply was applied only in part: show why in the panel and the console."""
    _state.last_error = text
    print(f"[imhead] {text}", file=sys.stderr)


def notice() -> str:
    """The last automatic restart, for the panel (empty when there was none since the last manual restart)."""
    return _state.notice


def clear_error() -> None:
    """Forget the last error (tests start a scenario with a clean panel)."""
    _state.last_error = ""


# --- timer -----------------------------------------------------------------------------------------------

def _timer() -> float | None:
    if _state.client is None:
        return None
    try:
        pump_backend()
    except Exception:  # keep the timer alive; the error is shown via last_error
        traceback.print_exc()
    return TIMER_BUSY_S if _state.jobs else TIMER_IDLE_S


def _ensure_timer() -> None:
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=TIMER_BUSY_S, persistent=True)


def _redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()
