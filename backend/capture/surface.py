"""Points of the model's surface as differentiable functions of the codes and the pose, IMavatar-style: find
the point by iterative root finding with no autograd graph, then attach the gradient the implicit function
theorem gives at the solution, x(theta) = x* - (J^T J)^-1 J^T r(x*, theta) with J = dr/dx at x* held fixed. Its
value is x* (r(x*) ~ 0) and its derivative is -(J^T J)^-1 J^T dr/dtheta, the least-squares solution's exact
first-order sensitivity; no graph through the iterations is kept.

Used for the landmarks (the canonical point whose template coordinate is a given ICT vertex, then its posed
position through the inverse of the backward expression warp) and for rendering (sphere tracing rays
against the posed SDF)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Residual = Callable[[Tensor], Tensor]  # (..., 3) points -> (..., m) residuals, m >= 3, pointwise independent


def residual_and_jacobian(residual: Residual, x: Tensor) -> tuple[Tensor, Tensor]:
    """r (..., m) and J = dr/dx (..., m, 3) by one reverse pass per residual component (points are
    independent, so the gradient of a component's sum holds every point's row)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        r = residual(xg)
        rows = [torch.autograd.grad(r[..., i].sum(), xg, retain_graph=i + 1 < r.shape[-1])[0]
                for i in range(r.shape[-1])]
    return r.detach(), torch.stack(rows, -2)


def _normal_solve(J: Tensor, r: Tensor, damping: float) -> Tensor:
    """(J^T J + damping I)^-1 J^T r, pointwise: (..., 3). A point whose system is singular or not finite (a
    surface point the solve lost, e.g. where the warp folds) gets 0: it stays where it is, with no gradient,
    instead of failing every other point's solve."""
    jt = J.transpose(-1, -2)
    eye = torch.eye(3, dtype=J.dtype, device=J.device)
    jtj = jt @ J + damping * eye
    rhs = jt @ r[..., None]
    with torch.no_grad():  # which systems are usable; the others become I x = 0, also for the backward pass
        ok = torch.isfinite(jtj).flatten(-2).all(-1) & torch.isfinite(rhs).flatten(-2).all(-1)
        x, info = torch.linalg.solve_ex(torch.where(ok[..., None, None], jtj, eye), torch.where(
            ok[..., None, None], rhs, torch.zeros_like(rhs)))
        ok = ok & (info == 0) & torch.isfinite(x).flatten(-2).all(-1)
    jtj = torch.where(ok[..., None, None], jtj, eye)
    rhs = torch.where(ok[..., None, None], rhs, torch.zeros_like(rhs))
    return torch.linalg.solve(jtj, rhs)[..., 0]


def gauss_newton(residual: Residual, x0: Tensor, iters: int, damping: float = 1e-9,
                 max_step: float = 0.02) -> tuple[Tensor, Tensor]:
    """Damped Gauss-Newton from x0 (no graph); steps clipped to max_step metres. Returns x* and J at x*."""
    x = x0.detach().clone()
    r, J = residual_and_jacobian(residual, x)
    for _ in range(iters):
        step = _normal_solve(J, r, damping)
        norm = step.norm(dim=-1, keepdim=True)
        x = x - step * torch.clamp(max_step / norm.clamp_min(1e-12), max=1.0)
        r, J = residual_and_jacobian(residual, x)
    return x, J


def chord(residual: Residual, x0: Tensor, J: Tensor, iters: int = 1, damping: float = 1e-9,
          max_step: float = 0.02) -> Tensor:
    """Gauss-Newton steps with a Jacobian from an earlier solve (the chord method): one forward pass each, no
    reverse passes. While the unknowns move slowly (an optimisation's consecutive steps) the stale J still
    contracts; the attached gradient uses it too, which changes the gradient's direction by about as much as J
    has changed since."""
    x = x0.detach()
    with torch.no_grad():
        for _ in range(iters):
            step = _normal_solve(J, residual(x), damping)
            norm = step.norm(dim=-1, keepdim=True)
            x = x - step * torch.clamp(max_step / norm.clamp_min(1e-12), max=1.0)
    return x


def attach(x_star: Tensor, J: Tensor, live_residual: Tensor, damping: float = 1e-9) -> Tensor:
    """x* with the implicit-function gradient: `live_residual` is r(x*, theta) computed with the graph to theta."""
    return x_star.detach() - _normal_solve(J.detach(), live_residual, damping)


def sphere_trace(sdf: Callable[[Tensor], Tensor], origin: Tensor, direction: Tensor, near: Tensor, far: Tensor,
                 steps: int = 32, hit_eps: float = 5e-4, relax: float = 0.9, hit_tol: float = 2e-3
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """March rays o + s d (unit d) from s = near: s += relax * sdf until |sdf| < hit_eps or s > far. Returns
    (hit (...,) bool, s at the hit or, for a miss, where the SDF along the ray was smallest, that smallest SDF).
    A ray counts as a hit when its smallest SDF is below hit_tol: rays grazing the surface converge slowly, and
    within the step budget they must not count as misses. No graph: the caller attaches gradients."""
    with torch.no_grad():
        s = near.clone()
        best_s, best_f = s.clone(), torch.full_like(s, float("inf"))
        active = torch.ones_like(s, dtype=torch.bool)
        for _ in range(steps):
            f = sdf(origin + s[..., None] * direction)
            better = active & (f < best_f)
            best_s, best_f = torch.where(better, s, best_s), torch.where(better, f, best_f)
            active = active & (f.abs() >= hit_eps) & (s <= far)
            if not bool(active.any()):
                break
            s = torch.where(active, s + relax * f.clamp_min(-0.01), s)
        hit = best_f < hit_tol
        return hit, best_s, best_f


def ray_sphere(origin: Tensor, direction: Tensor, centre: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Where unit rays enter and leave a sphere: (meets (...,) bool, near, far)."""
    oc = origin - centre
    b = (oc * direction).sum(-1)
    c = (oc * oc).sum(-1) - radius * radius
    disc = b * b - c
    root = disc.clamp_min(0).sqrt()
    return disc > 0, (-b - root).clamp_min(0), -b + root
