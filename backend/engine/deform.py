"""Expressions on a fixed topology: move canonical vertices x_c to posed positions x with

    F(x) = x + warp(x, z_exp) - x_c = 0          (the model's warp is backward: posed -> canonical)

for many expression vectors at once (IMavatar's correspondence search). Per point and frame: start from the
first-order estimate x0 = x_c - warp(x_c), take the exact 3x3 Jacobian J = I + d warp/dx there (autograd, once),
then Broyden's method with the inverse-Jacobian rank-one update (one warp evaluation per iteration; a step
that increases |F| is halved up to twice first).
Points stop as soon as |F| <= tol; only the unconverged ones are evaluated in later iterations.

Fallback: a point still above tol after max_iter keeps the iterate with the smallest |F| it has visited (never
worse than the first-order estimate, which is the first iterate), and is reported as not converged.
Vertex order and topology are unchanged: output vertex i of every frame belongs to canonical vertex i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# warp(x (P,3), frame (P,) long) -> dx (P,3): the backward warp of each point under its frame's expression.
WarpFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DeformResult:
    vertices: torch.Tensor  # (T,N,3) posed positions
    root_residual: torch.Tensor  # (T,N) |x + warp(x) - x_c|
    converged: torch.Tensor  # (T,N) bool
    iterations: int


def _jacobian(warp: WarpFn, x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """J = I + d warp / dx, (P,3,3), by three reverse-mode passes (each point's warp depends on itself only)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        dx = warp(xg, frame)
        rows = [torch.autograd.grad(dx[:, i].sum(), xg, retain_graph=i < 2)[0] for i in range(3)]
    return torch.eye(3, device=x.device, dtype=x.dtype) + torch.stack(rows, 1).detach()


def solve(warp: WarpFn, x_c: torch.Tensor, n_frames: int, *, tol: float = 1e-6, max_iter: int = 30,
          chunk: int = 1 << 17) -> DeformResult:
    """Posed positions for canonical points x_c (N,3) under each of n_frames expressions (see module doc).
    tol is in metres (1e-6 = 1 micrometre)."""
    n = x_c.shape[0]
    frame = torch.arange(n_frames, device=x_c.device).repeat_interleave(n)
    target = x_c.repeat(n_frames, 1)
    out = torch.empty_like(target)
    res = torch.empty(target.shape[0], device=x_c.device, dtype=x_c.dtype)
    iters = 0
    for s in range(0, target.shape[0], chunk):
        sl = slice(s, s + chunk)
        x, r, it = _solve_chunk(warp, target[sl], frame[sl], tol, max_iter)
        out[sl], res[sl] = x, r
        iters = max(iters, it)
    return DeformResult(out.view(n_frames, n, 3), res.view(n_frames, n), (res <= tol).view(n_frames, n), iters)


def _solve_chunk(warp: WarpFn, x_c: torch.Tensor, frame: torch.Tensor, tol: float, max_iter: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    with torch.no_grad():
        x = x_c - warp(x_c, frame)
        f = x + warp(x, frame) - x_c
    b = torch.linalg.inv(_jacobian(warp, x, frame))  # inverse Jacobian estimate, refined by Broyden
    best_x, best_r = x.clone(), f.norm(dim=1)
    active = torch.nonzero(best_r > tol).squeeze(1)
    it = 0
    with torch.no_grad():
        while active.numel() and it < max_iter:
            it += 1
            xa, fa, ba = x[active], f[active], b[active]
            step = -(ba @ fa[:, :, None]).squeeze(2)
            fr, xca = frame[active], x_c[active]
            xn = xa + step
            fn = xn + warp(xn, fr) - xca
            # Backtracking: a step that increases |F| is halved (at most twice) before Broyden learns from it.
            worse = torch.nonzero(fn.norm(dim=1) > fa.norm(dim=1)).squeeze(1)
            for _ in range(2):
                if not worse.numel():
                    break
                step[worse] *= 0.5
                xn[worse] = xa[worse] + step[worse]
                fn[worse] = xn[worse] + warp(xn[worse], fr[worse]) - xca[worse]
                worse = worse[fn[worse].norm(dim=1) > fa[worse].norm(dim=1)]
            # Good Broyden, Sherman-Morrison form: B += (s - B y) s^T B / (s^T B y).
            y = fn - fa
            by = (ba @ y[:, :, None]).squeeze(2)
            stb = (step[:, None, :] @ ba).squeeze(1)
            denom = (step * by).sum(1, keepdim=True)
            ok = denom.abs() > 1e-30
            upd = (step - by)[:, :, None] * stb[:, None, :] / torch.where(ok, denom, torch.ones_like(denom))[:, :, None]
            b[active] = ba + upd * ok[:, :, None]
            x[active], f[active] = xn, fn
            rn = fn.norm(dim=1)
            better = rn < best_r[active]
            best_x[active[better]] = xn[better]
            best_r[active[better]] = rn[better]
            # Diverging points (non-finite) stop here and keep their best iterate.
            active = active[(rn > tol) & torch.isfinite(rn)]
    return best_x, best_r, it
