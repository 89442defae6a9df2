"""CPU thread count for torch on a shared machine.

torch uses one OpenMP thread per core. When other processes already keep the cores busy, every parallel
region waits for its descheduled threads: on the 2-core test machine with ~5 runnable processes, the 128^3
extraction took 27.5 s with 2 threads and 3.5 s with 1 (weights loading: 1.2 s vs 0.07 s). So the CLI and
the server measure how much CPU is free while the process imports torch (`mark_start` at process start,
`limit_torch_threads` after the import) and use only that many threads. Results do not depend on it beyond
float rounding. OMP_NUM_THREADS / MKL_NUM_THREADS / IMHEAD_CPU_THREADS set by the user win.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, TypeVar

_START: tuple[float, float, tuple[int, int] | None] | None = None
ENV = "IMHEAD_CPU_THREADS"
T = TypeVar("T")
R = TypeVar("R")


def _idle_total() -> tuple[int, int] | None:
    """(idle, total) jiffies summed over all CPUs from /proc/stat; None where there is none (not Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def mark_start() -> None:
    """Remember the wall clock, this process's CPU time and the machine's idle time (call at process start)."""
    global _START
    _START = (time.perf_counter(), time.process_time(), _idle_total())


def free_cpus() -> float | None:
    """Cores not used by other processes since `mark_start`: idle cores plus the share this process used."""
    if _START is None or _START[2] is None:
        return None
    now = _idle_total()
    wall = time.perf_counter() - _START[0]
    if now is None or wall < 0.2:
        return None
    idle, total = now[0] - _START[2][0], now[1] - _START[2][1]
    if total <= 0:
        return None
    n = os.cpu_count() or 1
    own = (time.process_time() - _START[1]) / wall
    return n * idle / total + min(own, 1.0)


def limit_torch_threads() -> int | None:
    """Lower torch's intra-op threads to the free cores (never raise them); returns the count set, if any."""
    import torch

    if any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    if os.environ.get(ENV, "").strip().isdigit():
        n = max(1, int(os.environ[ENV]))
    else:
        free = free_cpus()
        if free is None:
            return None
        n = max(1, min(torch.get_num_threads(), int(free + 0.5)))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def thread_slices(n: int, chunk: int) -> list[slice]:
    """Slices of range(n), at most `chunk` long, as many as a multiple of torch's intra-op thread count (when
    n allows) and of equal length to within one (so thread_map's threads finish together); one empty slice
    for n = 0."""
    import torch

    threads = torch.get_num_threads()
    pieces = max(1, -(-n // max(chunk, 1)))
    if threads > 1 and n >= threads:
        pieces = -(-pieces // threads) * threads
    bounds = [n * i // pieces for i in range(pieces + 1)]  # lengths differ by at most one
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(item) for item in items] on as many Python threads as torch has intra-op threads, each running torch's
    ops on one thread (restored after) under the caller's grad mode. For work that does not parallelise inside its
    ops: the per-region network products (engine/extract_grid.py, Session.sdf_grad_template) and MeshIndex's
    cKDTree searches (engine/template.py)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    items = list(items)
    threads = torch.get_num_threads()
    if min(threads, len(items)) <= 1:
        return [fn(item) for item in items]
    # grad mode is per thread: a new thread records autograd graphs even for a caller under no_grad (an SDF of
    # parameters that require grad then kept every chunk's activations alive: the CPU eval's extraction)
    grad = torch.is_grad_enabled()

    def start_thread() -> None:
        torch.set_num_threads(1)
        torch.set_grad_enabled(grad)

    try:
        with ThreadPoolExecutor(min(threads, len(items)), initializer=start_thread) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
