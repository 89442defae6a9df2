"""Latent fitting: find the identity (and optionally expression) whose zero level set passes through given
points. Used by the engine's fit (after rigid/scale alignment) and by the evaluation.

The identity is optimised in whitened coordinates u, z_id = mean + L u (L: Cholesky factor of the training
code covariance), with a Gaussian prior |u|^2 / D, so the fit stays inside the learnt identity space.
The optimiser is Adam with one second moment per code vector (CodeAdam), so that steps follow the gradient's
direction and the fit depends continuously on its input points (the same head in two input frames gives
the same codes).
Optionally the 39 region codes are then refined directly (regularised toward their decoded values), which is
how the HeadSpec's `region_overrides` can carry detail that z_id alone does not reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .imhead import ImHead


@dataclass
class FitResult:
    z_id: Tensor  # (B, 256)
    z_exp: Tensor  # (B, 53), zeros unless fit_expression
    zr: Tensor  # (B, 39, 32) final region codes (decoded from z_id unless refine_regions)
    losses: list[float] = field(default_factory=list)
    final_abs_sdf: Tensor | None = None  # (B,) mean |sdf| at the input points after fitting (m)


class CodeAdam(torch.optim.Optimizer):
    """Adam whose second moment is shared along the last axis (one per code vector), not one per coordinate.

    Per-coordinate Adam moves every coordinate by about lr on its first steps whatever the size of its
    gradient, so coordinates with gradients near zero took full steps in directions set by float rounding or
    micrometres of alignment: one head fitted in two input frames gave codes 5% apart. A shared scale keeps
    the step proportional to the gradient; whitened codes have no preferred axes to scale separately."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=p.new_zeros(*p.shape[:-1], 1))
                st["t"] += 1
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].lerp_(p.grad.square().mean(-1, keepdim=True), 1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


def _batched(points: Tensor) -> Tensor:
    if points.dim() == 2:
        points = points[None]
    if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
        raise ValueError(f"points must be (N,3) or (B,N,3) with N > 0, got {tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain non-finite values")
    return points


def fit_latents(
    model: ImHead,
    points: Tensor,
    normals: Tensor | None = None,
    *,
    fit_expression: bool,
    steps: int = 300,
    id_mean: Tensor | None = None,
    id_chol: Tensor | None = None,
    lr: float = 0.03,
    prior_weight: float = 1e-4,
    normal_weight: float = 0.01,
    batch_points: int = 4096,
    topk: int | None = 8,
    region_steps: int = 0,
    region_weight: float = 1e-3,
    init_z_id: Tensor | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit latents so that `points` (model frame, metres) lie on the zero level set.

    points/normals: (N,3) or (B,N,3). Returns codes with a leading batch axis. `callback(step, loss)` is
    called every step (the engine raises errors.Cancelled from it). `steps` identity(+expression) steps
    are followed by `region_steps` steps that refine the region codes directly."""
    pts = _batched(points)
    B, N, _ = pts.shape
    nrm = None
    if normals is not None:
        nrm = _batched(normals)
        if nrm.shape != pts.shape:
            raise ValueError(f"normals {tuple(nrm.shape)} must match points {tuple(pts.shape)}")
        nrm = torch.nn.functional.normalize(nrm, dim=-1)
    dev, D = pts.device, model.cfg.id_dim
    mean = torch.zeros(D, device=dev) if id_mean is None else id_mean.to(dev).float()
    chol = torch.eye(D, device=dev) if id_chol is None else id_chol.to(dev).float()
    gen = torch.Generator(device="cpu").manual_seed(seed)

    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        if init_z_id is None:
            u0 = torch.zeros(B, D, device=dev)
        else:
            u0 = torch.linalg.solve_triangular(chol, (init_z_id.to(dev).float() - mean).T, upper=False).T
        u = u0.clone().requires_grad_(True)
        e_logit = torch.full((B, model.cfg.n_expressions), -5.0, device=dev, requires_grad=fit_expression)
        params = [u] + ([e_logit] if fit_expression else [])
        opt = CodeAdam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
        losses: list[float] = []

        def z_exp_now() -> Tensor:
            if not fit_expression:
                return torch.zeros(B, model.cfg.n_expressions, device=dev)
            return torch.sigmoid(e_logit)

        def surface_loss(zr: Tensor, k: Tensor, z_id: Tensor, zexp: Tensor) -> Tensor:
            sel = torch.randperm(N, generator=gen)[: min(batch_points, N)].to(dev)
            x = pts[:, sel].clone().requires_grad_(nrm is not None)
            xc = x + model.warp(x, zexp, z_id) if fit_expression else x
            s = model.sdf(xc, zr, k, topk=topk)
            loss = s.abs().mean()
            if nrm is not None:
                (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)
                cos = torch.nn.functional.cosine_similarity(g, nrm[:, sel], dim=-1)
                loss = loss + normal_weight * (1 - cos).mean()
            return loss

        for step in range(steps):
            z_id = mean + u @ chol.T
            zr, k = model.decode(z_id)
            loss = surface_loss(zr, k, z_id, z_exp_now()) + prior_weight * (u**2).sum(-1).mean() / D
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])

        with torch.no_grad():
            z_id = (mean + u @ chol.T).detach()
            zr0 = model.region_codes(z_id).detach()
        zr = zr0.clone()
        if region_steps > 0:
            zr.requires_grad_(True)
            ropt = CodeAdam([zr] + ([e_logit] if fit_expression else []), lr=lr * 0.1)
            for step in range(region_steps):
                loss = surface_loss(zr, model.anchors(zr), z_id, z_exp_now())
                loss = loss + region_weight * ((zr - zr0) ** 2).sum((-1, -2)).mean() / zr.shape[1]
                ropt.zero_grad(set_to_none=True)
                loss.backward()
                ropt.step()
                losses.append(float(loss.detach()))
                if callback is not None:
                    callback(steps + step, losses[-1])
        zr = zr.detach()
        zexp = z_exp_now().detach()
        with torch.no_grad():
            k = model.anchors(zr)
            xs = pts + model.warp(pts, zexp, z_id) if fit_expression else pts
            final_abs = torch.cat(
                [model.sdf(c, zr, k, topk=topk).abs() for c in xs.split(8192, dim=1)], dim=1
            ).mean(-1)
        return FitResult(z_id=z_id, z_exp=zexp, zr=zr, losses=losses, final_abs_sdf=final_abs)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
