"""The server's memory guard: refuse a mesh request that would not fit the machine, and give memory back to the
system after every request.

The estimate is a fit to peak resident growth measured on the 2-core CPU machine (docs/reliability.md): about
2 MB per unit of resolution plus 1.5 kB per cell of a resolution x resolution slice, times a safety margin.
Only ops that extract a mesh at a requested resolution are checked; their other inputs are bounded by the
engine's own limits.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

from . import constants
from .errors import BackendError

MB = 2**20
MESH_OPS = {"generate": 256, "edit": 256, "fit": 128}  # op -> the engine's resolution when none is given
PER_RESOLUTION_MB = 2.0
PER_SLICE_CELL_MB = 0.0015
MARGIN = 1.2
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 8 * MB
BUDGET_ENV = "IMHEAD_MEMORY_BUDGET_MB"  # caps the budget below what the machine has (tests, shared machines)


class MemoryTooSmall(BackendError):
    code = "insufficient_memory"


def estimate_mb(resolution: int) -> float:
    """Peak memory a mesh of `resolution` adds to the backend, margin included."""
    return MARGIN * (PER_RESOLUTION_MB * resolution + PER_SLICE_CELL_MB * resolution**2)


def available_mb() -> float | None:
    """Memory the backend may still use: the smaller of the system's MemAvailable, the cgroup's free limit and
    $IMHEAD_MEMORY_BUDGET_MB minus what this process holds; None where none of them can be read."""
    limits = []
    meminfo = _read("/proc/meminfo")
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            limits.append(int(line.split()[1]) / 1024)
    cg_max, cg_now = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if cg_max.isdigit() and cg_now.isdigit():
        limits.append((int(cg_max) - int(cg_now)) / MB)
    budget = os.environ.get(BUDGET_ENV, "")
    if budget:
        try:
            limits.append(float(budget) - resident_mb())
        except ValueError:
            print(f"[imhead-backend] ignoring {BUDGET_ENV}={budget!r}: not a number", file=sys.stderr)
    return min(limits) if limits else None


def resident_mb() -> float:
    statm = _read("/proc/self/statm").split()
    return int(statm[1]) * os.sysconf("SC_PAGE_SIZE") / MB if len(statm) > 1 else 0.0


def _glibc() -> ctypes.CDLL | None:
    """glibc, whose allocator the guard tunes and trims; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class MemoryGuard:
    """`backend.server.ResourceGuard` for the engine session."""

    def __init__(self) -> None:
        # glibc raises its mmap threshold each time a big block is freed, so later grids and meshes come from the
        # heap and stay resident after the request (docs/reliability.md has the measurement); a fixed threshold
        # keeps big buffers in their own mappings, returned on free.
        libc = _glibc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)

    def check(self, op: str, params: dict[str, Any]) -> None:
        if op not in MESH_OPS or not isinstance(params, dict):
            return
        resolution = params.get("resolution", MESH_OPS[op])
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            return  # the op itself refuses it with invalid_input
        resolution = min(max(resolution, 1), constants.MAX_RESOLUTION)
        need, free = estimate_mb(resolution), available_mb()
        if free is not None and need > free:
            fits = [r for r in (768, 512, 384, 256, 192, 128, 64) if r < resolution and estimate_mb(r) <= free]
            hint = f"; resolution {fits[0]} would fit" if fits else ""
            raise MemoryTooSmall(f"{op} at resolution {resolution} needs about {need / 1024:.1f} GB but only "
                                 f"{max(free, 0) / 1024:.1f} GB is free{hint}. Lower the resolution or close other "
                                 "programs.")

    def release(self) -> None:
        """Hand freed heap pages back to the system (glibc keeps them otherwise: 1.0 GB resident stayed after a
        512 mesh, 0.45 GB after trimming)."""
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
