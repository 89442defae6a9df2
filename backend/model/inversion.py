"""Latent fitting: find the identity (and optionally expression) whose zero level set passes through given
points. Used by the engine's fit (after rigid/scale alignment) and by the evaluation.

The identity is optimised in whitened coordinates u, z_id = mean + L u (L: Cholesky factor of the training
code covariance), with a Gaussian prior |u|^2 / D, so the fit stays inside the learnt identity space.
The optimiser is Adam with one second moment per code vector (CodeAdam), so that steps follow the gradient's
direction and the fit depends continuously on its input points (the same head in two input frames gives
the same codes).
Minibatches: every step fits a random subset of the points, drawn from per-point random keys indexed by
`point_ids` (stable names of the points, e.g. their index among all input samples before outlier removal),
so that dropping or adding one point changes the minibatches by at most that point. All minibatch indices
are drawn up front on the CPU and sent to the device once, and the loop has no host synchronisation (losses
stay on the device until the end), so on a GPU the steps queue back to back.

With `fit_pose` the points' rigid pose is fitted with the codes, by the same optimiser: an input aligned to the
mean head sits a few degrees and millimetres off the pose of its own head (the identity differs from the mean),
and codes fitted at that pose bend the head to follow it; re-aligning to the fitted head afterwards barely moves
it, since the bent head already matches (weights/MODEL_CARD.md, "The fit CLI against the eval").

Optionally the 39 region codes are then refined directly (regularised toward their decoded values), which is
how the HeadSpec's `region_overrides` can carry detail that z_id alone does not reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
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
    pose: Tensor | None = None  # (B,3,4) [R | t] with fit_pose: the points as fitted are R x + t


# The pose's coordinates: a rotation vector times POSE_RADIUS and a translation, both metres of displacement at
# about a head's radius, so that one learning rate (metres per step) suits both: POSE_LR per unit of the codes'
# learning rate, so that the pose keeps pace with the codes (which otherwise bend the head to a wrong pose).
POSE_RADIUS = 0.1
POSE_LR = 0.01


class CodeAdam:
    """Adam whose second moment is shared along the last axis (one per code vector), not one per coordinate.

    Per-coordinate Adam moves every coordinate by about lr on its first steps whatever the size of its
    gradient, so coordinates with gradients near zero took full steps in directions set by float rounding or
    micrometres of alignment: one head fitted in two input frames gave codes 5% apart. A shared scale keeps
    the step proportional to the gradient; whitened codes have no preferred axes to scale separately.

    `cosine_steps`: the learning rate follows lr_min + (lr - lr_min)(1 + cos(pi t / T)) / 2 over T steps
    (torch's CosineAnnealingLR in closed form). Not a torch.optim.Optimizer: constructing one imports
    torch._dynamo (and sympy), 4-6 s of a process's first fit on the GPU machine."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, cosine_steps: int = 0, lr_min: float = 0.0):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.base_lr, self.cosine_steps, self.lr_min = lr, cosine_steps, lr_min
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [p.new_zeros(*p.shape[:-1], 1) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.lerp_(p.grad.square().mean(-1, keepdim=True), 1 - b2)
            # p -= lr m_hat / (sqrt(v_hat) + eps), bias corrections folded into scalars (fewer kernels)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))
        if self.cosine_steps > 0:
            phase = math.pi * min(self.t, self.cosine_steps) / self.cosine_steps
            self.lr = self.lr_min + (self.base_lr - self.lr_min) * (1 + math.cos(phase)) / 2


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a stateless hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def minibatches(point_ids: np.ndarray, steps: int, n_batch: int, seed: int) -> Tensor:
    """Indices (steps, n_batch) into point_ids: step k takes the n_batch points with the smallest
    hash(seed, k, id). The key of a point depends on its id only, not on which other points are present, so
    one point more or less changes each minibatch by at most that point."""
    ids = np.asarray(point_ids, np.int64).astype(np.uint64)
    n_batch = min(n_batch, len(ids))
    out = np.empty((steps, n_batch), np.int64)
    base = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    per_chunk = max(1, (1 << 22) // max(len(ids), 1))
    with np.errstate(over="ignore"):
        for s in range(0, steps, per_chunk):
            k = np.arange(s, min(s + per_chunk, steps), dtype=np.uint64)[:, None]
            keys = _mix64(_mix64(base ^ (k * np.uint64(0x9E3779B97F4A7C15)))
                          + ids[None] * np.uint64(0xD6E8FEB86659FD93))
            part = np.argpartition(keys, n_batch - 1, axis=1)[:, :n_batch] if n_batch < len(ids) else \
                np.broadcast_to(np.arange(len(ids)), keys.shape)
            out[s : s + len(k)] = np.sort(part, axis=1)
    return torch.from_numpy(out)


def _skew(w: Tensor) -> Tensor:
    """(B,3) -> (B,3,3) cross-product matrices."""
    o = torch.zeros_like(w[:, 0])
    return torch.stack([o, -w[:, 2], w[:, 1], w[:, 2], o, -w[:, 0], -w[:, 1], w[:, 0], o], -1).view(-1, 3, 3)


def pose_matrix(motion: Tensor, centre: Tensor) -> Tensor:
    """[R | t] (B,3,4) of a motion (B,6) (rotation vector and translation, see POSE_RADIUS), turning about
    centre (B,3)."""
    rot = torch.linalg.matrix_exp(_skew(motion[:, :3] / POSE_RADIUS))
    t = centre + motion[:, 3:] - (rot @ centre[:, :, None])[:, :, 0]
    return torch.cat([rot, t[:, :, None]], -1)


def apply_pose(m: Tensor, x: Tensor) -> Tensor:
    """[R | t] (B,3,4) applied to points (B,N,3)."""
    return x @ m[:, :, :3].transpose(1, 2) + m[:, None, :, 3]


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
    lr: float = 0.1,
    prior_weight: float = 1e-4,
    normal_weight: float = 0.01,
    batch_points: int = 4096,
    topk: int | None = 8,
    region_steps: int = 0,
    region_weight: float = 1e-3,
    init_z_id: Tensor | None = None,
    seed: int = 0,
    callback: Callable[[int, Tensor], None] | None = None,
    point_ids: Tensor | None = None,
    final_abs: bool = True,
    fit_pose: bool = False,
) -> FitResult:
    """Fit latents so that `points` (model frame, metres) lie on the zero level set.

    points/normals: (N,3) or (B,N,3). Returns codes with a leading batch axis. `callback(step, loss)` is
    called every step (the engine raises errors.Cancelled from it); `loss` is a 0-d tensor on the points'
    device: float() it only when needed (on a GPU that waits for the queued steps). `steps`
    identity(+expression) steps are followed by `region_steps` steps that refine the region codes directly.
    point_ids: (N,) distinct non-negative integers naming the points for the minibatch draw (default
    0..N-1). final_abs: also evaluate the mean |sdf| at all points after fitting (FitResult.final_abs_sdf).
    fit_pose: fit a rotation and translation of the points (about their centroid) with the identity steps
    (FitResult.pose)."""
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
    n_batch = min(batch_points, N)
    total_steps = max(steps, 0) + max(region_steps, 0)
    if point_ids is None:
        point_ids = torch.arange(N)
    point_ids = torch.as_tensor(point_ids, dtype=torch.long, device="cpu")
    if point_ids.shape != (N,) or (N and int(point_ids.min()) < 0):
        raise ValueError(f"point_ids must be (N,) = ({N},) non-negative integers, got {tuple(point_ids.shape)}")
    selection = minibatches(point_ids.numpy(), total_steps, n_batch, seed).to(dev)  # one host -> device copy

    # Flush denormals on the CPU: fits of some heads (an ICT held-out identity) reach denormal activations or
    # gradients, which made steps many times slower (docs/benchmarks.md, "Engine tuning").
    flush = dev.type == "cpu" and torch.set_flush_denormal(True)
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
        opt = CodeAdam(params, lr=lr, cosine_steps=max(steps, 1), lr_min=lr * 0.05)
        centre = pts.mean(1)
        motion = torch.zeros(B, 6, device=dev, requires_grad=fit_pose)
        pose_opt = CodeAdam([motion] if fit_pose else [], lr=POSE_LR * lr, cosine_steps=max(steps, 1),
                            lr_min=POSE_LR * lr * 0.05)
        pose: Tensor | None = None
        losses: list[Tensor] = []

        neutral = torch.zeros(B, model.cfg.n_expressions, device=dev)

        def z_exp_now() -> Tensor:
            return torch.sigmoid(e_logit) if fit_expression else neutral

        def surface_loss(zr: Tensor, k: Tensor, z_id: Tensor, zexp: Tensor, step: int, pose: Tensor | None
                         ) -> Tensor:
            sel = selection[step]
            x = pts[:, sel].requires_grad_(nrm is not None and pose is None)  # indexing copies: a fresh leaf
            n = None if nrm is None else nrm[:, sel]
            if pose is not None:
                x = apply_pose(pose, x)
                n = None if n is None else n @ pose[:, :, :3].transpose(1, 2)
            xc = x + model.warp(x, zexp, z_id) if fit_expression else x
            s = model.sdf(xc, zr, k, topk=topk)
            loss = s.abs().mean()
            if n is not None:
                (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)
                loss = loss + normal_weight * (1 - torch.nn.functional.cosine_similarity(g, n, dim=-1)).mean()
            return loss

        for step in range(steps):
            z_id = mean + u @ chol.T
            zr, k = model.decode(z_id)
            pose = pose_matrix(motion, centre) if fit_pose else None
            loss = surface_loss(zr, k, z_id, z_exp_now(), step, pose) + prior_weight * (u**2).sum(-1).mean() / D
            opt.zero_grad()
            pose_opt.zero_grad()
            loss.backward()
            opt.step()
            pose_opt.step()
            losses.append(loss.detach())
            if callback is not None:
                callback(step, losses[-1])
        if fit_pose:
            with torch.no_grad():
                pose = pose_matrix(motion, centre)
            pts = apply_pose(pose, pts)  # the region steps and final_abs see the points as fitted
            nrm = None if nrm is None else nrm @ pose[:, :, :3].transpose(1, 2)

        with torch.no_grad():
            z_id = (mean + u @ chol.T).detach()
            zr0 = model.region_codes(z_id).detach()
        zr = zr0.clone()
        if region_steps > 0:
            zr.requires_grad_(True)
            ropt = CodeAdam([zr] + ([e_logit] if fit_expression else []), lr=lr * 0.1)
            for step in range(region_steps):
                loss = surface_loss(zr, model.anchors(zr), z_id, z_exp_now(), steps + step, None)
                loss = loss + region_weight * ((zr - zr0) ** 2).sum((-1, -2)).mean() / zr.shape[1]
                ropt.zero_grad()
                loss.backward()
                ropt.step()
                losses.append(loss.detach())
                if callback is not None:
                    callback(steps + step, losses[-1])
        zr = zr.detach()
        zexp = z_exp_now().detach()
        final = None
        if final_abs:
            with torch.no_grad():
                k = model.anchors(zr)
                xs = pts + model.warp(pts, zexp, z_id) if fit_expression else pts
                final = torch.cat(
                    [model.sdf(c, zr, k, topk=topk).abs() for c in xs.split(8192, dim=1)], dim=1
                ).mean(-1)
        loss_list = torch.stack(losses).tolist() if losses else []
        return FitResult(z_id=z_id, z_exp=zexp, zr=zr, losses=loss_list, final_abs_sdf=final, pose=pose)
    finally:
        if flush:
            torch.set_flush_denormal(False)  # PyTorch's default
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
