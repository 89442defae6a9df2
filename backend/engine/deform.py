"""Expressions on a fixed topology: move canonical vertices x_c to posed positions x with

    F(x) = x + warp(x, z_exp) - x_c = 0          (the model's warp is backward: posed -> canonical)

for many expression vectors at once (IMavatar's correspondence search). Per point and frame:

1. the fixed-point estimate x0 = x_c - warp(x_c) (two warp evaluations: warp(x_c), then F(x0)). Where the
   warp is small and slowly varying (about half of a face's vertices for a sparse expression, all of the back
   of the head) this is already within tol and the point stops here;
2. the points still above tol continue with Broyden's method (inverse-Jacobian rank-one update, one warp
   evaluation per iteration; a step that increases |F| is halved up to twice first). Steps 1-2 are Broyden from
   B = I started at x_c, so the initial inverse-Jacobian estimate is I updated with the secant x_c -> x0 (no
   autograd). Measured on the trained model this needs ~2 iterations per unconverged point, cheaper than an
   exact Jacobian (one forward + three backward passes) and as robust;
3. points still above tol after JACOBIAN_AFTER iterations (~1% for sparse expressions) restart Broyden from
   the exact inverse Jacobian (I + d warp/dx)^-1 at their current iterate (autograd).

Points stop as soon as |F| <= tol; later iterations evaluate only the unconverged ones (compacted, so the
state of converged points is never touched again). Frames listed in `zero_frames` (an identically zero warp,
e.g. an all-zero expression vector) are not evaluated at all: x = x_c and F = 0 exactly.

Fallback: a point still above tol after max_iter keeps the iterate with the smallest |F| it has visited (never
worse than the fixed-point estimate x0, the first iterate), and is reported as not converged.
Vertex order and topology are unchanged: output vertex i of every frame belongs to canonical vertex i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# warp(x (P,3), frame (P,) long) -> dx (P,3): the backward warp of each point under its frame's expression.
WarpFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Matrix products of fewer rows round differently on the CPU (measured: 1-11 rows with two threads, none from
# 12); the warp pads smaller batches to this many rows, so a point's root does not depend on which other points
# are solved with it (the surface opener's motion is then the deform op's: docs/surface.md)
MIN_ROWS = 32
JACOBIAN_AFTER = 5  # Broyden iterations before a still-unconverged point gets the exact Jacobian
CONTINUATION_STEP = 0.25  # largest expression weight change per solve_continued step (continuation_steps)
# The deform op (session_pose) and the surface opener's motion: a point that the path leaves unconverged in a frame
# follows paths of 2x, then 4x the steps there (near a fold of the warp, the mouth corners under jawOpen, a step of
# 0.25 can leave the root's basin)
REFINE_PATH = 2


@dataclass
class DeformResult:
    vertices: torch.Tensor  # (T,N,3) posed positions
    root_residual: torch.Tensor  # (T,N) |F| = |x + warp(x) - x_c| at the returned positions
    converged: torch.Tensor  # (T,N) bool
    iterations: int  # Broyden iterations of the slowest point (0: every point stopped at x0)
    root_vector: torch.Tensor | None = None  # (T,N,3) F itself, the canonical-space miss x + warp(x) - x_c
    stats: dict | None = None  # counts of warp evaluations etc. (see solve)


def model_warp(model, z_id: torch.Tensor, expressions: torch.Tensor, chunk: int) -> WarpFn:
    """ImHead.warp for frame-indexed expressions (T,53), evaluated in chunks of `chunk` points, with the
    per-frame constants folded into the network (same function, ~23% fewer multiply-adds per point):
    the first layer's conditioning columns (z_exp, warp_id(z_id)) become a per-frame bias, and the last layer's
    53x3 expression basis contracted with z_exp becomes a per-frame 3-output layer. Falls back to model.warp
    where the network is not the expected Linear/SiLU stack."""
    cfg, layers = model.cfg, list(model.warp_net)
    n_exp = cfg.n_expressions
    linear = layers[::2]
    if not (all(isinstance(m, nn.Linear) for m in linear) and all(isinstance(m, nn.SiLU) for m in layers[1::2])
            and len(layers) % 2 == 1 and linear[-1].out_features == 3 * n_exp):
        return _generic_model_warp(model, z_id, expressions, chunk)
    from ..model.encoding import encoding_freqs, positional_encoding

    first, hidden, last = linear[0], linear[1:-1], linear[-1]
    e = expressions.to(first.weight.dtype)
    with torch.no_grad():
        cond = torch.cat([e, model.warp_id(z_id.reshape(1, -1)).expand(e.shape[0], -1)], -1)  # (T, 53 + id)
        n_enc = first.in_features - cond.shape[1]
        w_enc = first.weight[:, :n_enc]
        bias1 = first.bias + cond @ first.weight[:, n_enc:].T  # (T,H)
        w_last = cfg.warp_scale * torch.einsum("ech,te->tch", last.weight.view(n_exp, 3, -1), e)  # (T,3,H)
        b_last = cfg.warp_scale * e @ last.bias.view(n_exp, 3)  # (T,3)

    n_frames = e.shape[0]
    freqs = encoding_freqs(cfg.warp_pe_freqs, w_enc.device, w_enc.dtype)

    def head(h: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        # Frames [lo, hi] in this chunk (all of them without a host sync when there are few).
        lo, hi = (0, n_frames - 1) if 3 * n_frames <= last.out_features else torch.stack(torch.aminmax(frame)).tolist()
        span = hi - lo + 1
        if span == 1:  # the same product as below, without picking each point's frame (fewer launches)
            return h @ w_last[lo : lo + 1].reshape(3, -1).T + b_last[lo]
        if 3 * span <= last.out_features:  # all frames of the chunk in one matmul, then pick each point's own
            y = (h @ w_last[lo : hi + 1].reshape(3 * span, -1).T).view(-1, span, 3)
            y = y.gather(1, (frame - lo)[:, None, None].expand(-1, 1, 3))[:, 0]
        else:  # many frames in one chunk: the model's own basis contraction
            basis = (h @ last.weight.T + last.bias).view(-1, n_exp, 3)
            return cfg.warp_scale * torch.einsum("pec,pe->pc", basis, e[frame])
        return y + b_last[frame]

    silu = torch.nn.functional.silu

    def warp(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # in-place activations (less memory traffic) unless differentiating
        out = []
        for s in range(0, x.shape[0], chunk):
            xs, fs = x[s : s + chunk], frame[s : s + chunk]
            rows = xs.shape[0]
            if rows < MIN_ROWS:  # a few points: padded, so each point's warp is the same in any batch
                xs = torch.cat([xs, xs[:1].expand(MIN_ROWS - rows, -1)])
                fs = torch.cat([fs, fs[:1].expand(MIN_ROWS - rows)])
            enc = positional_encoding(xs.to(w_enc.dtype), cfg.warp_pe_freqs, cfg.global_pe_scale, freqs)
            h = silu(torch.addmm(bias1[fs], enc, w_enc.T), inplace=inplace)
            for layer in hidden:
                h = silu(torch.addmm(layer.bias, h, layer.weight.T), inplace=inplace)
            out.append(head(h, fs)[:rows].to(x.dtype))
        if len(out) == 1:  # no copy
            return out[0]
        return torch.cat(out) if out else x.new_zeros((0, 3))

    return warp


def _generic_model_warp(model, z_id: torch.Tensor, expressions: torch.Tensor, chunk: int) -> WarpFn:
    def warp(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, x.shape[0], chunk):
            xs, fs = x[s : s + chunk], frame[s : s + chunk]
            # One point per batch row: the warp takes a per-row expression and identity.
            out.append(model.warp(xs[:, None, :], expressions[fs], z_id.reshape(1, -1).expand(xs.shape[0], -1))[:, 0])
        return torch.cat(out) if out else x.new_zeros((0, 3))

    return warp


def _jacobian(warp: WarpFn, x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """J = I + d warp / dx, (P,3,3), by three reverse-mode passes (each point's warp depends on itself only)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        dx = warp(xg, frame)
        rows = [torch.autograd.grad(dx[:, i].sum(), xg, retain_graph=i < 2)[0] for i in range(3)]
    return torch.eye(3, device=x.device, dtype=x.dtype) + torch.stack(rows, 1).detach()


def solve(warp: WarpFn, x_c: torch.Tensor, n_frames: int, *, tol: float = 1e-6, max_iter: int = 30,
          chunk: int | None = None, zero_frames: torch.Tensor | None = None, start: torch.Tensor | None = None
          ) -> DeformResult:
    """Posed positions for canonical points x_c (N,3) under each of n_frames expressions (see module doc).
    tol is in metres (1e-6 = 1 micrometre). zero_frames: optional (n_frames,) bool, frames whose warp is
    identically zero (skipped: x = x_c exactly). stats counts point evaluations: `warp_points` (forward
    warps), `jacobian_points` (points that needed the autograd Jacobian), `stopped_at_x0`. chunk: points
    solved together (default: 4M on GPU, where per-iteration launch and sync overhead dominates small
    batches, 128k on CPU); the warp function chunks its own network evaluation. start: optional (n_frames,N,3)
    points to iterate from instead of x_c (continuation: solve_continued); zero frames still return x_c."""
    if chunk is None:
        chunk = 1 << 22 if x_c.is_cuda else 1 << 17
    n = x_c.shape[0]
    frames = torch.arange(n_frames, device=x_c.device)
    if zero_frames is not None:
        frames = frames[~zero_frames.to(device=x_c.device, dtype=torch.bool)]
    out = x_c.repeat(n_frames, 1)
    fvec = torch.zeros_like(out)
    res = torch.zeros(out.shape[0], device=x_c.device, dtype=x_c.dtype)
    stats = {"warp_points": 0, "jacobian_points": 0, "stopped_at_x0": 0, "skipped_frames": n_frames - len(frames)}
    iters = 0
    # Points of the frames that need solving, frame-major; chunks of `chunk` points.
    flat = (frames[:, None] * n + torch.arange(n, device=x_c.device)).reshape(-1)
    for s in range(0, flat.shape[0], chunk):
        idx = flat[s : s + chunk]
        fr = torch.div(idx, n, rounding_mode="floor")
        y = None if start is None else start.reshape(-1, 3)[idx]
        x, f, r, it = _solve_chunk(warp, x_c[idx - fr * n], fr, tol, max_iter, stats, y)
        out[idx], fvec[idx], res[idx] = x, f, r
        iters = max(iters, it)
    return DeformResult(out.view(n_frames, n, 3), res.view(n_frames, n), (res <= tol).view(n_frames, n), iters,
                        fvec.view(n_frames, n, 3), stats)


def _secant_update(b: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Good Broyden, Sherman-Morrison form: B += (s - B y) s^T B / (s^T B y); B (P,3,3) estimates J^-1, s the
    step, y the change of F. A point whose denominator vanishes keeps its B."""
    by = (b @ y[:, :, None]).squeeze(2)
    stb = (s[:, None, :] @ b).squeeze(1)
    denom = (s * by).sum(1, keepdim=True)
    ok = denom.abs() > 1e-30
    upd = (s - by)[:, :, None] * stb[:, None, :] / torch.where(ok, denom, torch.ones_like(denom))[:, :, None]
    return b + upd * ok[:, :, None]


def _solve_chunk(warp: WarpFn, x_c: torch.Tensor, frame: torch.Tensor, tol: float, max_iter: int, stats: dict,
                 start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    y = x_c if start is None else start
    with torch.no_grad():
        w0 = warp(y, frame)  # from x_c: = F(x_c)
        x = x_c - w0  # one fixed-point step from y
        f = x + warp(x, frame) - x_c
        r = f.norm(dim=1)
        s0 = -w0 if start is None else x - y  # that step; F(y) = -s0
    stats["warp_points"] += 2 * x.shape[0]
    active = torch.nonzero((r > tol) & (r < math.inf)).squeeze(1)  # a norm: below inf is finite, one launch
    stats["stopped_at_x0"] += x.shape[0] - active.numel()
    if not active.numel():
        return x, f, r, 0
    # Compacted state of the unconverged points; x, f, r hold each point's best iterate (x0 at first).
    xa, fa, fra, xca, s0a = x[active], f[active], frame[active], x_c[active], s0[active]
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    with torch.no_grad():  # B = I after its first step y -> x0 (step s0, change of F: F(x0) - F(y) = F(x0) + s0)
        ba = _secant_update(eye.expand(active.numel(), 3, 3), s0a, fa + s0a)
    best_r = r[active]
    it = 0
    while active.numel() and it < max_iter:
        if it == JACOBIAN_AFTER:  # slow points: restart from the exact inverse Jacobian at the current iterate
            ba = torch.linalg.inv(_jacobian(warp, xa, fra))
            stats["jacobian_points"] += xa.shape[0]
        it += 1
        with torch.no_grad():
            step = -(ba @ fa[:, :, None]).squeeze(2)
            xn = xa + step
            fn = xn + warp(xn, fra) - xca
            stats["warp_points"] += xn.shape[0]
            ra = fa.norm(dim=1)
            # Backtracking: a step that increases |F| is halved (at most twice) before Broyden learns from it.
            worse = torch.nonzero(fn.norm(dim=1) > ra).squeeze(1)
            for _ in range(2):
                if not worse.numel():
                    break
                half = step[worse] * 0.5  # each gather once (launches)
                step[worse] = half
                xw = xa[worse] + half
                xn[worse] = xw
                fw = xw + warp(xw, fra[worse]) - xca[worse]
                fn[worse] = fw
                stats["warp_points"] += worse.numel()
                worse = worse[fw.norm(dim=1) > ra[worse]]
            rn = fn.norm(dim=1)
            better = rn < best_r  # (no boolean indexing: no host sync on GPU)
            best_r = torch.where(better, rn, best_r)
            x.index_copy_(0, active, torch.where(better[:, None], xn, x[active]))
            f.index_copy_(0, active, torch.where(better[:, None], fn, f[active]))
            r.index_copy_(0, active, best_r)
            # Diverging points (non-finite) stop here and keep their best iterate.
            keep = torch.nonzero((rn > tol) & (rn < math.inf)).squeeze(1)
            if not keep.numel() or it == max_iter:
                break
            step, fn, xn, fa = step[keep], fn[keep], xn[keep], fa[keep]
            ba = _secant_update(ba[keep], step, fn - fa)
            xa, fa, fra, xca, best_r, active = xn, fn, fra[keep], xca[keep], best_r[keep], active[keep]
    return x, f, r, it


def solve_continued(make_warp: Callable[[float | torch.Tensor], WarpFn], x_c: torch.Tensor, n_frames: int,
                    steps: int | torch.Tensor, path_points: torch.Tensor | None = None, refine: int = 0,
                    **kwargs) -> DeformResult:
    """solve() along the path t = 1/steps, 2/steps, ..., 1 of expressions t x e, each solve starting from the
    last one's positions (make_warp(t): the warp of the expressions scaled by t). Where surfaces that touch in
    the canonical head part (lips under jawOpen), the backward warp has several roots near a contact point, and
    a start from x_c can land on the other side's; following the path keeps each point on its own side.
    `steps` per frame ((T,) tensor): frame i follows its own path, t_i = min(1, k / steps_i) as a (T, 1)
    tensor, so a frame's pose does not depend on the other frames of its request (a bake equals live poses).
    refine: a point the path leaves unconverged in a frame follows paths of 2x, 4x, ... the steps (the deform op:
    REFINE_PATH, 2x and 4x); the frame takes the first that converges there (every converged point's root is the
    one of `steps`). Iterations and
    stats are summed over the steps (stats["refined_points"]: points that followed a finer path).

    path_points: optional (N,) bool, the points that follow the path (those near a contact); every other point
    is solved once at the full weights, and any of them not converged in some frame follows the path after all
    (each point's solve is its own, so the path points get what the whole set would; docs/surface.md measures
    that the others land on the same roots). Iterations: the larger of the two parts'."""
    if path_points is not None:
        path = path_points.to(device=x_c.device, dtype=torch.bool)
        if path.shape != (x_c.shape[0],):
            raise ValueError(f"path_points: shape {tuple(path.shape)} for {x_c.shape[0]} points")
        if (int(steps.max()) if isinstance(steps, torch.Tensor) and steps.numel() else steps) > 1 \
                and not bool(path.all()):
            return _solve_split(make_warp, x_c, n_frames, steps, path, refine, kwargs)
    return _solve_path(make_warp, x_c, n_frames, steps, refine, **kwargs)


def _solve_split(make_warp: Callable[[float | torch.Tensor], WarpFn], x_c: torch.Tensor, n_frames: int,
                 steps: int | torch.Tensor, path: torch.Tensor, refine: int, kwargs: dict) -> DeformResult:
    """solve_continued with path_points: one solve at the full weights for the other points, the path for the
    path points and for those of the others not converged in some frame."""
    if isinstance(steps, torch.Tensor):
        full: float | torch.Tensor = (steps / steps).to(device=x_c.device, dtype=torch.float32).clamp(max=1.0)[:, None]
    else:
        full = 1.0  # the path's last t, exactly
    rest = torch.nonzero(~path).squeeze(1)
    direct = solve(make_warp(full), x_c[rest], n_frames, **kwargs)
    redo = ~direct.converged.all(0)
    keep, follow = rest[~redo], torch.sort(torch.cat([torch.nonzero(path).squeeze(1), rest[redo]])).values
    cont = _solve_path(make_warp, x_c[follow], n_frames, steps, refine, **kwargs) if follow.numel() else None
    n = x_c.shape[0]
    vertices = x_c.new_empty((n_frames, n, 3))
    residual = x_c.new_empty((n_frames, n))
    converged = torch.empty((n_frames, n), dtype=torch.bool, device=x_c.device)
    root = x_c.new_empty((n_frames, n, 3))
    parts = [(keep, direct, torch.nonzero(~redo).squeeze(1))]
    if cont is not None:
        parts.append((follow, cont, torch.arange(follow.numel(), device=x_c.device)))
    for idx, res, sel in parts:  # points idx of the whole set are points sel of that part
        assert res.root_vector is not None
        vertices[:, idx], residual[:, idx] = res.vertices[:, sel], res.root_residual[:, sel]
        converged[:, idx], root[:, idx] = res.converged[:, sel], res.root_vector[:, sel]
    stats = dict(direct.stats or {})
    for key, value in ((cont.stats or {}) if cont is not None else {}).items():
        stats[key] = stats.get(key, 0) + value
    stats["path_points"] = int(follow.numel())
    iters = max(direct.iterations, cont.iterations if cont is not None else 0)
    return DeformResult(vertices, residual, converged, iters, root, stats)


def _solve_path(make_warp: Callable[[float | torch.Tensor], WarpFn], x_c: torch.Tensor, n_frames: int,
                steps: int | torch.Tensor, refine: int = 0, **kwargs) -> DeformResult:
    """solve_continued for every point; a point not converged in some frame then follows a path of twice the
    steps (up to `refine` times), and each frame where it was not converged takes that path's root where it
    converges (a frame's pose stays independent of the other frames')."""
    result = _solve_steps(make_warp, x_c, n_frames, steps, **kwargs)
    redo = torch.nonzero(~result.converged.all(0)).squeeze(1)
    if refine <= 0 or not redo.numel():
        return result
    finer = _solve_path(make_warp, x_c[redo], n_frames, steps * 2, refine - 1, **kwargs)
    assert result.root_vector is not None and finer.root_vector is not None
    take = finer.converged & ~result.converged[:, redo]  # (T, R)
    for whole, part in ((result.vertices, finer.vertices), (result.root_residual, finer.root_residual),
                        (result.converged, finer.converged), (result.root_vector, finer.root_vector)):
        mask = take if whole.dim() == 2 else take[:, :, None]
        whole[:, redo] = torch.where(mask, part, whole[:, redo])
    result.iterations += finer.iterations
    stats = result.stats if result.stats is not None else {}
    for key in ("warp_points", "jacobian_points", "refined_points"):  # the work; stopped_at_x0 is the first path's
        stats[key] = stats.get(key, 0) + (finer.stats or {}).get(key, 0)
    stats["refined_points"] += int(redo.numel())
    result.stats = stats
    return result


def _solve_steps(make_warp: Callable[[float | torch.Tensor], WarpFn], x_c: torch.Tensor, n_frames: int,
                 steps: int | torch.Tensor, **kwargs) -> DeformResult:
    """solve() along the path of `steps` steps, each from the last one's positions."""
    total_steps = int(steps.max()) if isinstance(steps, torch.Tensor) else steps
    result, start, iters = None, None, 0
    total: dict[str, int] = {}
    for k in range(1, total_steps + 1):
        if isinstance(steps, torch.Tensor):
            t = (k / steps.to(device=x_c.device, dtype=torch.float32)).clamp(max=1.0)[:, None]
            result = solve(make_warp(t), x_c, n_frames, start=start, **kwargs)
        else:
            result = solve(make_warp(k / total_steps), x_c, n_frames, start=start, **kwargs)
        start = result.vertices
        iters += result.iterations
        for key, value in (result.stats or {}).items():
            total[key] = total.get(key, 0) + value
    assert result is not None
    result.iterations, result.stats = iters, total
    return result


def frame_continuation_steps(expressions: torch.Tensor) -> torch.Tensor:
    """continuation_steps of each frame of expressions (T,53) on its own: (T,) long."""
    if expressions.numel() == 0:
        return torch.ones(expressions.shape[0], dtype=torch.long)
    top = expressions.abs().amax(1).double().cpu()
    return torch.clamp(torch.ceil(top / CONTINUATION_STEP - 1e-9), min=1).long()


def continuation_steps(expressions: torch.Tensor) -> int:
    """solve_continued steps for expressions (T,53): one per CONTINUATION_STEP of the largest |weight|."""
    if expressions.numel() == 0:
        return 1
    return max(1, math.ceil(float(expressions.abs().max()) / CONTINUATION_STEP - 1e-9))
