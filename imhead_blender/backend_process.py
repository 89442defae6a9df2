"""The backend subprocess itself, for client.py: spawning `python -m backend serve`, the writer and stderr
threads' bodies, the reaper that SIGKILLs a process that will not exit, and the message that reports its
death. bpy-free, standard library only."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterable

STDERR_TAIL_LINES = 12
KILL_GRACE_S = 2.0  # a backend told to stop gets this long before SIGKILL (a hung one gets none)
EOF_GRACE_S = 2.0  # after end of stdout, how long pump() waits for the exit status and last stderr lines
ERROR_PREFIX = "[imhead-backend] error:"  # a start-up failure's one-line reason on stderr


def has_backend(backend_root: str) -> bool:
    return (Path(backend_root) / "backend" / "__main__.py").is_file()


def spawn(python: str, backend_root: str, extra_env: dict) -> subprocess.Popen:
    """`python -m backend serve` with cwd and PYTHONPATH = `backend_root`, all three pipes; raises OSError."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env.update(extra_env)
    env["PYTHONPATH"] = backend_root
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
    else:
        kwargs["start_new_session"] = True  # Ctrl+C in Blender's terminal must not kill the backend
    return subprocess.Popen([python, "-m", "backend", "serve"], cwd=backend_root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def write_frames(gen: int, stream, outbox: queue.Queue, events: queue.Queue) -> None:
    """Writer thread: encoded frames from `outbox` to stdin until None, then close it."""
    try:
        while (frame := outbox.get()) is not None:
            stream.write(frame)
            stream.flush()
        stream.close()
    except (OSError, ValueError) as exc:
        events.put((gen, "write_failed", str(exc)))


def read_stderr(stream, tail: deque[str]) -> None:
    """Stderr thread: echo each line to our stderr and keep the last few in `tail`."""
    try:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            tail.append(line)
            print(line, file=sys.stderr)
    except (OSError, ValueError):
        pass


def reap_process(proc: subprocess.Popen, grace: float, threads: list[threading.Thread]) -> None:
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


def last_error_line(lines: Iterable[str], failed: bool) -> str:
    """The backend's own explanation of a failed start (`[imhead-backend] error: ...`); else, when it exited with
    an error status, its last line (a traceback's exception, a launcher's message)."""
    lines = list(lines)
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last if failed else ""


def death_message(status: int | None, stderr_tail: Iterable[str]) -> str:
    """How the backend ended (`status`: its exit status, None while it still runs), its reason and last output."""
    lines = list(stderr_tail)
    tail = "\n".join(lines)
    error = last_error_line(lines, failed=status is not None and status > 0)
    if status is None:
        how = "closed its output but kept running, so it was killed"
    else:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    message = f"the imhead backend {how}" + (f": {error}" if error else "")
    return message + (f"; its last output:\n{tail}" if tail else " (no output)")
