"""Speed and memory benchmark behind `python -m backend bench`: one markdown table.

Rows: sparse extraction (ours) vs the NPHM-style dense baseline (every lattice point through all 39 local
networks, scikit-image marching cubes) in the same run, with the accuracy of ours against it (largest
vertex distance either way in voxels, sign agreement at our evaluated points); deform of a 50k-vertex mesh
per frame; fit of the mean head moved to a random frame; cold start (a fresh process until its first mesh
is written); peak memory (the process's peak RSS during the row on CPU, torch's peak allocation on CUDA).
Where the dense baseline would take too long (`--dense-max-points`), its time is extrapolated from a timed
slice of the lattice and marked "~".
"""

from __future__ import annotations

import math
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar, cast

import numpy as np
import torch
from scipy.spatial import cKDTree

from .extract import extract_dense
from .extract_grid import _evaluate, _unkey, make_grid

T = TypeVar("T")


@dataclass
class Row:
    task: str
    device: str
    size: str
    ours_ms: float | None = None
    baseline_ms: float | None = None
    baseline_extrapolated: bool = False
    detail: str = ""
    peak_mb: float | None = None

    def cells(self) -> list[str]:
        speed = ""
        if self.ours_ms and self.baseline_ms:
            speed = f"{'~' if self.baseline_extrapolated else ''}{self.baseline_ms / self.ours_ms:.0f}x"
        base = "" if self.baseline_ms is None else f"{'~' if self.baseline_extrapolated else ''}{self.baseline_ms:.1f}"
        return [self.task, self.device, self.size, "" if self.ours_ms is None else f"{self.ours_ms:.1f}", base, speed,
                self.detail, "" if self.peak_mb is None else f"{self.peak_mb:.0f}"]


HEADER = ["task", "device", "size", "ours (ms)", "dense baseline (ms)", "speed-up", "detail", "peak mem (MB)"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Median wall time (ms) of `repeats` runs, after one warm-up run on CUDA; returns the last result."""
    out = fn() if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times)), cast(T, out)


def _reset_peak(device: torch.device) -> None:
    """Start a row's peak: torch's counter on CUDA; on Linux the process's peak RSS (VmHWM) is set back to
    the current RSS by writing 5 to /proc/self/clear_refs (else the CPU peak is the process's so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    dense_max_points: int = 3_000_000  # beyond this the dense baseline is extrapolated from a slice
    frames: int = 4
    deform_vertices: int = 50_000
    fit: bool = True
    cold: bool = True
    repeats: int = 7
    seed: int = 0
    bake_frames: int = 250  # the add-on's Bake of a 128^3 head (bench_bake.py); 0 skips it
    capture_tracks: Path | None = None  # tracked clips for the photo/video rows (capture/bench.py)


def bench_device(session, cfg: BenchConfig, log) -> list[Row]:
    from .head import HeadSpec

    dev = session.device
    rows: list[Row] = []
    logged = 0

    def stage(message: str) -> None:  # logs the rows measured so far first: a run cut short keeps them
        nonlocal logged
        for row in rows[logged:]:
            log("row: " + " | ".join(row.cells()))
        logged = len(rows)
        log(message)
    head = HeadSpec(session.sample_identity(cfg.seed))
    z_id, zr, k = session.decode(head)

    def dense_sdf(x: torch.Tensor) -> torch.Tensor:
        return session.model.sdf(x[None], zr, k)[0].float()  # all 39 regions at every point

    for size in cfg.sizes:
        stage(f"extraction {size} on {dev}")
        _reset_peak(dev)
        reps = cfg.repeats if dev.type == "cuda" else 1
        # timed as generate runs it; the evaluated points for the sign check come from one more, untimed run
        ours_ms, (mesh, stats, dropped) = _timed(lambda: session.canonical_mesh(zr, k, size), dev, reps)
        row = Row("extract", str(dev.type), f"{size}^3", ours_ms, peak_mb=_peak_mb(dev))
        n_dense = int(np.prod(make_grid(size).points_shape))
        detail = [f"{stats.points_evaluated / n_dense * 100:.1f}% of {n_dense / 1e6:.1f}M pts",
                  f"{len(mesh.vertices)} verts", f"drop<={dropped:.0e}",
                  "evaluate/MC/clean-up " + "/".join(f"{v * 1e3:.0f}" for v in stats.seconds.values()) + " ms"]
        if n_dense <= cfg.dense_max_points:
            with torch.no_grad():  # same small-piece clean-up as ours (extract.MIN_COMPONENT): apples to apples
                base_ms, (ref, volume) = _timed(lambda: extract_dense(dense_sdf, size, device=dev), dev, 1)
            row.baseline_ms = base_ms
            d1 = cKDTree(ref.vertices).query(mesh.vertices)[0].max() if len(mesh.vertices) else np.inf
            d2 = cKDTree(mesh.vertices).query(ref.vertices)[0].max() if len(ref.vertices) else np.inf
            detail.append(f"max|dv| {max(d1, d2) / stats.voxel:.3f} vox")
            samples: list = []
            session.canonical_mesh(zr, k, size, samples=samples)
            idx = torch.cat([s[0] for s in samples]).cpu().numpy()
            val = torch.cat([s[1] for s in samples]).cpu().numpy()
            inside = (idx < np.array(volume.shape)).all(axis=1)
            agree = np.sign(volume[tuple(idx[inside].T)]) == np.sign(val[inside])
            detail.append(f"sign agrees at {agree.mean() * 100:.4f}% of {inside.sum()} evaluated pts")
        else:
            row.baseline_ms, row.baseline_extrapolated = _dense_extrapolated(dense_sdf, size, dev), True
        row.detail = ", ".join(detail)
        rows.append(row)
        if dev.type == "cuda" and size >= 256:  # the other network evaluations, against the default's mesh
            variants = {"extract, " + ("float32 (torch, exact)" if session.extract_half else "float16 (fused kernel)"):
                        ("extract_half", not session.extract_half),
                        f"extract, {'sparse' if session.extract_mode == 'dense' else 'dense'} regions":
                        ("extract_mode", "sparse" if session.extract_mode == "dense" else "dense")}
            tree = cKDTree(mesh.vertices)
            for name, (attr, value) in variants.items():
                saved = getattr(session, attr)
                setattr(session, attr, value)
                ms, (mesh2, _, _) = _timed(lambda: session.canonical_mesh(zr, k, size), dev, cfg.repeats)
                setattr(session, attr, saved)
                dv = max(tree.query(mesh2.vertices)[0].max(), cKDTree(mesh2.vertices).query(mesh.vertices)[0].max())
                rows.append(Row(name, dev.type, f"{size}^3", ms, peak_mb=_peak_mb(dev),
                                detail=f"{len(mesh2.vertices)} verts, "
                                       f"max|dv| vs the row above {dv / stats.voxel:.3f} vox"))

    stage(f"generate on {dev}")
    rows.append(_bench_generate(session, head, cfg, dev))
    stage(f"deform on {dev}")
    rows.append(_bench_deform(session, head, cfg, dev))
    if cfg.fit:
        stage(f"fit on {dev}")
        rows.append(_bench_fit(session, cfg, dev))
        from ..capture.bench import bench_capture  # mediapipe and PyAV load only here

        stage(f"photo/video fit on {dev}")
        rows += bench_capture(session, dev, cfg.capture_tracks)
    if cfg.bake_frames:
        from .bench_bake import bench_bake

        stage(f"bake of {cfg.bake_frames} frames on {dev}")
        rows.append(bench_bake(session, cfg.bake_frames, seed=cfg.seed))
    stage(f"done on {dev}")
    return rows


def _dense_extrapolated(sdf, size: int, dev: torch.device) -> float:
    """Time a slice of the dense lattice (1M points on CUDA, 128k on CPU) and scale to the whole (marching
    cubes not included)."""
    grid = make_grid(size)
    shape = grid.points_shape
    n = math.prod(shape)
    m = min(n, 1 << 20 if dev.type == "cuda" else 1 << 17)
    idx = _unkey(torch.arange(m, device=dev), shape)
    pts = grid.to_world(idx)
    with torch.no_grad():
        ms, _ = _timed(lambda: _evaluate(sdf, pts, 1 << 18), dev, 1)
    return ms * n / m


def _bench_generate(session, head, cfg: BenchConfig, dev: torch.device) -> Row:
    """What a Generate click waits for in the engine: extraction plus every vertex attribute, as numpy arrays
    (the add-on's default resolution on CPU, 256^3 on a GPU)."""
    size = 256 if dev.type == "cuda" else 128
    params = {"head": head.to_dict(), "resolution": size}

    def run() -> tuple[dict, dict]:
        session.template_index.forget()  # the same head again would find its template query remembered
        return session.generate(params, {})

    _reset_peak(dev)
    ms, (out, arrays) = _timed(run, dev, cfg.repeats if dev.type == "cuda" else 3)
    return Row("generate", dev.type, f"{size}^3", ms, peak_mb=_peak_mb(dev),
               detail=f"extraction + SDF, normals, template, region, UV of {len(arrays['vertices'])} vertices")


def _bench_deform(session, head, cfg: BenchConfig, dev: torch.device) -> Row:
    # The first 50k vertices of the same 256^3 head on every device. The residual includes each canonical
    # vertex's own |sdf| (marching cubes' chord error, docs/benchmarks.md "Engine tuning"), so the row also
    # reports that floor.
    _, mesh = session.generate({"head": head.to_dict(), "resolution": 256}, {})
    canonical = mesh["canonical"]
    reps = math.ceil(cfg.deform_vertices / len(canonical))
    canonical = np.concatenate([canonical] * reps)[: cfg.deform_vertices]
    rng = np.random.default_rng(cfg.seed)
    expr = rng.uniform(0, 1, (cfg.frames, 53)).astype(np.float32) * (rng.random((cfg.frames, 53)) < 0.2)
    z_id, zr, k = session.decode(head)
    _reset_peak(dev)
    ms, res = _timed(lambda: session.pose(canonical, z_id, zr, k, expr, exact_residual=False), dev,
                     1 if dev.type == "cpu" else cfg.repeats)
    floor = float(np.percentile(session.vertex_sdf(canonical, zr, k).abs().cpu().numpy(), 99))
    detail = (f"{cfg.frames} frames, {res['iterations']} Broyden its, {res['non_converged']} not converged, "
              f"residual p99 {res['residual_p99_m'] * 1e3:.4f} mm (canonical vertices' |sdf| p99 {floor * 1e3:.4f} mm)")
    return Row("deform / frame", dev.type, f"{len(canonical) // 1000}k verts", ms / cfg.frames, detail=detail,
               peak_mb=_peak_mb(dev))


def _bench_fit(session, cfg: BenchConfig, dev: torch.device) -> Row:
    from scipy.spatial.transform import Rotation

    a = session.atlas
    rot = Rotation.random(random_state=cfg.seed).as_matrix()
    pts = (a.vertices.astype(np.float64) @ rot.T * 100 + 3.0).astype(np.float32)  # cm, rotated, shifted
    _reset_peak(dev)
    t = time.perf_counter()
    out, _ = session.fit({"resolution": 128, "seed": cfg.seed}, {"points": pts, "faces": a.faces})
    ms = (time.perf_counter() - t) * 1e3
    f = out["fit"]
    detail = (f"mean head, random frame, cm; {f['steps']} steps x {f['batch_points']} pts; error "
              f"{out['error']['trimmed_one_sided_cd_mm']:.2f} mm (trimmed one-sided CD)")
    return Row("fit", dev.type, f"{len(pts)} pts", ms, detail=detail, peak_mb=_peak_mb(dev))


def bench_cold_start(device: str, weights: Path | None) -> Row:
    """A fresh `python -m backend generate` at 128^3, timed from process start to the written mesh."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cold.ply"
        cmd = [sys.executable, "-m", "backend", "generate", "--seed", "0", "--resolution", "128", "-o", str(out),
               "--device", device]
        if weights is not None:
            cmd += ["--weights", str(weights)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        ms = (time.perf_counter() - t) * 1e3
        ok = proc.returncode == 0 and out.exists()
    return Row("cold start", device, "128^3", ms if ok else None,
               detail="process start -> first mesh written" if ok else f"failed: {proc.stderr.strip()[-200:]}")


class _Server:
    """`python -m backend serve` in a child process, as the add-on runs it: handshake, wait for its warm-up,
    then requests timed from send to reply."""

    def __init__(self, device: str, weights: Path | None, timeout_s: float) -> None:
        cmd = [sys.executable, "-m", "backend", "serve", "--device", device]
        if weights is not None:
            cmd += ["--weights", str(weights)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=Path(__file__).resolve().parents[2])
        self.log: list[str] = []
        self.warmed = threading.Event()
        self.timeout_s = timeout_s
        self.next_id = 0
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))
            if "warm-up done" in self.log[-1] or "warm-up failed" in self.log[-1]:
                self.warmed.set()

    def call(self, op: str, params: dict) -> tuple[bool, float]:
        """(ok, seconds from request to reply)."""
        from .. import wire

        assert self.proc.stdin is not None and self.proc.stdout is not None  # both piped
        rid, self.next_id = self.next_id, self.next_id + 1
        t = time.perf_counter()
        self.proc.stdin.write(wire.encode_bytes(wire.request(rid, op, params)))
        self.proc.stdin.flush()
        while (msg := wire.read_frame(self.proc.stdout)) is not None:
            if msg.kind == "reply" and msg.id == rid:
                return bool(msg.header["ok"]), time.perf_counter() - t
        raise RuntimeError("the server exited")

    def start(self) -> bool:
        from .. import wire

        ok, _ = self.call("handshake", {"protocol": wire.PROTOCOL_VERSION})
        return ok and self.warmed.wait(self.timeout_s)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("shutdown", {})
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def failure(self) -> str:
        return f"failed: {''.join(self.log)[-200:]}"


def bench_prestarted(device: str, weights: Path | None, timeout_s: float = 300.0) -> Row:
    """The add-on starts `python -m backend serve` when its panel is first shown; the server warms up after the
    handshake. Timed: a generate at 128^3 sent once the warm-up is done, request to reply; the detail gives how
    long that readiness took from the spawn (a click later than that gets this latency)."""
    t0 = time.perf_counter()
    server = _Server(device, weights, timeout_s)
    try:
        ok = server.start()
        ready_s = time.perf_counter() - t0
        ok, s = server.call("generate", {"seed": 0, "resolution": 128}) if ok else (False, 0.0)
    finally:
        server.close()
    detail = (f"generate sent once the server had warmed up ({ready_s:.1f} s after its spawn; the add-on spawns it "
              "when its panel is first shown)") if ok else server.failure()
    return Row("first head, prestarted", device, "128^3", 1e3 * s if ok else None, detail=detail)


def bench_backend_share(device: str, size: int, weights: Path | None, repeats: int = 3,
                        timeout_s: float = 300.0) -> tuple[float | None, str]:
    """The backend's share of a complete head where Blender cannot run (no bpy module for this Python): the
    add-on's Generate (a head and the resolution; the reply carries everything eyes, teeth and materials are
    placed from) over the wire to a warm server, median of `repeats` random heads."""
    server = _Server(device, weights, timeout_s)
    try:
        if not server.start() or not server.call("generate", {"seed": 0, "resolution": 32})[0]:
            return None, server.failure()
        spent = []
        for seed in range(repeats):
            ok, s = server.call("generate", {"seed": 100 + seed, "resolution": size})
            if not ok:
                return None, server.failure()
            spent.append(s)
    finally:
        server.close()
    return statistics.median(spent), f"median of {repeats}"


def bench_complete_head(device: str, size: int, log, weights: Path | None = None, timeout_s: float = 900.0) -> Row:
    """The add-on's click-to-head time for a complete head (skin, eyes, teeth, materials) through real Blender
    (scripts/bench_head.py with the bpy module); a row saying why when that cannot run here."""
    import importlib.util
    import json

    task = "complete head in Blender (skin, eyes, teeth, materials)"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_head.py"
    if not script.is_file() or importlib.util.find_spec("bpy") is None:
        if device == "cpu":
            return Row(task, device, f"{size}^3", detail="skipped: needs a source checkout and the bpy module")
        log(f"complete head: no bpy module here, the backend's share on {device} at {size}^3")
        s, how = bench_backend_share(device, size, weights)
        return Row(task, device, f"{size}^3", None,
                   detail=(f"backend {1e3 * s:.0f} ms ({how}, the add-on's Generate request over the wire); add-on "
                           "share not measured: no bpy module here (docs/benchmarks.md adds the CPU machine's)")
                   if s is not None else how)
    log(f"complete head in Blender on {device} at {size}^3")
    proc = subprocess.run([sys.executable, str(script), "--resolution", str(size),
                           "--device", "GPU" if device == "cuda" else "CPU"],
                          capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return Row(task, device, f"{size}^3", detail=f"failed: {(proc.stderr or proc.stdout).strip()[-200:]}")
    r = json.loads(lines[-1])
    return Row(task, device, f"{size}^3", ours_ms=1000 * r["total_s"],
               detail=f"backend {1000 * (r['total_s'] - r['addon_s']):.0f} ms + add-on {1000 * r['addon_s']:.0f} ms "
                      f"(mesh, parts, materials), median of {r['repeats']}")
