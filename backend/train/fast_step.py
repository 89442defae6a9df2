"""The training forward with analytic spatial gradients (one backward pass instead of a double backward).

The normal and eikonal losses need dSDF/dx at every query point. `TrainModule` gets them from
`torch.autograd.grad(create_graph=True)` and then differentiates that graph again: three passes over the
(B, N, 39, 96) activations, none of which torch.compile can fuse (it does not support double backward).
Here every layer carries the point's Jacobian forward beside its value (forward-mode, 3 tangent columns),
so the loss is one ordinary graph: torch.compile can fuse it and its backward is a plain first-order pass.

Layout: region-major (R, B, N, ...) so each local layer is one batched matmul over regions with no permute;
the per-head code bias broadcasts over the point axis. Same numbers as `TrainModule` (tests compare loss and
parameter gradients in float32); under autocast the same layers run in bf16 as there (the local input layer,
fusion and template heads in float32).
"""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import ImHead
from .losses import LossWeights, TrainModule, loss_terms


def _silu(a: Tensor) -> tuple[Tensor, Tensor]:
    """silu(a) and its derivative."""
    sg = torch.sigmoid(a)
    return a * sg, sg * (1 + a * (1 - sg))


def _encoding_with_tangents(xs: Tensor, dxs: Tensor, n_freqs: int) -> tuple[Tensor, Tensor]:
    """gamma of scaled coordinates xs (..., 3) as in model.encoding, and its derivative along each input axis
    a: (..., 3[a], E). `dxs` (..., 3) is d xs_c / d x_c (the scale, times the mirror flip); coordinate c of
    xs moves only along axis c, so the tangent of axis a is zero outside coordinate a's entries."""
    eye = torch.eye(3, device=xs.device, dtype=xs.dtype)
    lin = eye * dxs[..., None, :]  # (..., 3[a], 3[c])
    if n_freqs == 0:
        return xs, lin
    freqs = (2.0 ** torch.arange(n_freqs, device=xs.device, dtype=xs.dtype)) * math.pi
    ang = xs[..., None, :] * freqs[:, None]  # (..., L, 3)
    sin, cos = torch.sin(ang), torch.cos(ang)
    scale = freqs[:, None] * dxs[..., None, :]  # (..., L, 3)
    d_sin = (cos * scale)[..., None, :, :] * eye[:, None, :]  # (..., 3[a], L, 3[c])
    d_cos = (-sin * scale)[..., None, :, :] * eye[:, None, :]
    enc = torch.cat([xs, sin.flatten(-2), cos.flatten(-2)], -1)
    tan = torch.cat([lin, d_sin.flatten(-2), d_cos.flatten(-2)], -1)
    return enc, tan


def _mlp_with_tangents(layers: nn.Sequential, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """An nn.Sequential of Linear/SiLU on values h (..., D) and tangents t (..., 3, D)."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
            t = F.linear(t, layer.weight)
        elif isinstance(layer, nn.SiLU):
            h, d = _silu(h)
            t = t * d[..., None, :]
        else:
            raise TypeError(f"unexpected layer {layer!r}")
    return h, t


def features_with_jacobian(m: ImHead, x: Tensor, zr: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Blended local features (B, N, F) of all 39 regions at x (B, N, 3) and d feature / d x (B, N, 3, F)."""
    cfg = m.cfg
    s = m.slot
    R = cfg.n_regions
    B, N, _ = x.shape
    d = x[None] - k.transpose(0, 1)[:, :, None, :]  # (R, B, N, 3)
    dxs = (cfg.pe_scale * m.flip)[:, None, None, :].to(x.dtype)  # (R, 1, 1, 3)
    enc, tenc = _encoding_with_tangents(d * dxs, dxs.expand_as(d), cfg.pe_freqs)
    E = enc.shape[-1]
    with torch.autocast(x.device.type, enabled=False):  # input layer in full precision, as ImHead does
        wx = m.loc_wx[s]
        h = torch.bmm(enc.reshape(R, B * N, E), wx).view(R, B, N, -1) + m._code_bias(zr).transpose(0, 1)[:, :, None]
        t = torch.bmm(tenc.reshape(R, B * N * 3, E), wx).view(R, B, N, 3, -1)
    h, dh = _silu(h)
    t = t * dh[..., None, :]
    for w, b in zip(m.loc_wh, m.loc_bh):
        H = h.shape[-1]
        wr = w[s]
        h = torch.bmm(h.reshape(R, B * N, H), wr).view(R, B, N, -1) + b[s][:, None, None]
        t = torch.bmm(t.reshape(R, B * N * 3, H), wr).view(R, B, N, 3, -1)
        h, dh = _silu(h)
        t = t * dh[..., None, :]
    H = h.shape[-1]
    g = torch.bmm(h.reshape(R, B * N, H), m.loc_wo[s]).view(R, B, N, -1) + m.loc_bo[s][:, None, None]
    tg = torch.bmm(t.reshape(R, B * N * 3, H), m.loc_wo[s]).view(R, B, N, 3, -1)

    dist = d.norm(dim=-1)  # (R, B, N)
    w = torch.softmax(-dist / cfg.sigma, dim=0)
    dlogit = -d / (dist[..., None] * cfg.sigma)  # (R, B, N, 3)
    dw = w[..., None] * (dlogit - (w[..., None] * dlogit).sum(0))
    g = g.to(w.dtype)
    feat = (w[..., None] * g).sum(0)
    tfeat = torch.einsum("rbna,rbnf->bnaf", dw, g) + torch.einsum("rbn,rbnaf->bnaf", w, tg.to(w.dtype))
    return feat, tfeat


Features = Callable[[ImHead, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def sdf_with_gradient(m: ImHead, x: Tensor, zr: Tensor, k: Tensor, features: Features = features_with_jacobian
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """SDF (B, N), its gradient (B, N, 3) and the blended features (B, N, F) at canonical points x;
    `features` computes (feat, tfeat) (fused_local's kernels can stand in for the torch layers)."""
    feat, tfeat = features(m, x, zr, k)
    with torch.autocast(x.device.type, enabled=False):  # fusion head in float32, as ImHead does
        dt = cast(nn.Linear, m.fusion[0]).weight.dtype
        res, tres = _mlp_with_tangents(m.fusion, feat.to(dt), tfeat.to(dt))
    rel = x - m.prior_center
    r = rel.norm(dim=-1)
    sdf = r - m.cfg.prior_radius + m.cfg.sdf_scale * res.squeeze(-1).to(x.dtype)
    grad = rel / r[..., None] + m.cfg.sdf_scale * tres.squeeze(-1).to(x.dtype)
    return sdf, grad, feat


def warp_with_jacobian(m: ImHead, x: Tensor, z_exp: Tensor, z_id: Tensor) -> tuple[Tensor, Tensor]:
    """ImHead.warp's dx (B, N, 3) and d dx_c / d x_a (B, N, 3[a], 3[c]). The last layer is folded with the
    expression weights first (one (H, 3) matrix per head instead of the (H, 53*3) basis)."""
    cfg = m.cfg
    layers = list(m.warp_net)
    first, last = cast(nn.Linear, layers[0]), cast(nn.Linear, layers[-1])
    dxs = torch.full_like(x, cfg.global_pe_scale)
    enc, tenc = _encoding_with_tangents(x * cfg.global_pe_scale, dxs, cfg.warp_pe_freqs)
    E = enc.shape[-1]
    cond = torch.cat([z_exp, m.warp_id(z_id)], -1)  # (B, C)
    h = F.linear(enc, first.weight[:, :E]) + (F.linear(cond.to(first.weight.dtype), first.weight[:, E:])
                                              + first.bias)[:, None]
    t = F.linear(tenc, first.weight[:, :E])
    h, t = _mlp_with_tangents(nn.Sequential(*layers[1:-1]), h, t)
    ne = cfg.n_expressions
    w_last = torch.einsum("be,ech->bch", z_exp.to(last.weight.dtype), last.weight.view(ne, 3, -1))  # (B, 3, H)
    b_last = torch.einsum("be,ec->bc", z_exp.to(last.bias.dtype), last.bias.view(ne, 3))  # (B, 3)
    dx = torch.einsum("bnh,bch->bnc", h, w_last.to(h.dtype)) + b_last[:, None].to(h.dtype)
    jac = torch.einsum("bnah,bch->bnac", t, w_last.to(t.dtype))
    return cfg.warp_scale * dx.to(x.dtype), cfg.warp_scale * jac.to(x.dtype)


class FastTrainModule(TrainModule):
    """TrainModule whose forward computes spatial gradients analytically (all 39 regions, no topk). With
    `fused`, the local networks and their blend run in fused_local's Triton kernels (CUDA, the shipped local
    architecture); the same numbers up to the kernels' rounding."""

    def __init__(self, model: ImHead, n_train: int, code_std: float = 0.01, id_coeff_dim: int | None = None,
                 fused: bool = False):
        super().__init__(model, n_train, code_std=code_std, id_coeff_dim=id_coeff_dim)
        self.features: Features = features_with_jacobian
        if fused:
            from . import fused_local  # imports Triton: only when asked for

            reason = fused_local.unsupported_reason(model)
            if reason is not None:
                raise ValueError(reason)
            self.features = fused_local.fused_features_with_jacobian

    def forward(self, batch: dict[str, Tensor], w: LossWeights, topk: int | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if topk is not None:
            raise ValueError("the analytic-gradient step evaluates all regions (topk None)")
        m = self.model
        z_id = self.identity_codes(batch)
        zr, k = m.decode(z_id)
        z_exp = batch["exp_weights"]
        xc = torch.cat([batch["surf_canon"], batch["canon_space"]], 1)
        xp = torch.cat([batch["surf_posed"], batch["space_posed"]], 1)
        dx, jac = warp_with_jacobian(m, xp, z_exp, z_id)
        q = torch.cat([xc, xp + dx], 1)
        s, grad, feat = sdf_with_gradient(m, q, zr, k, self.features)
        nc = xc.shape[1]
        gc = grad[:, :nc]
        gq = grad[:, nc:]
        gp = gq + torch.einsum("bnac,bnc->bna", jac, gq)  # chain rule through x_can = x + dx(x)
        return loss_terms(self, batch, w, z_id, zr, k, s, gc, gp, dx, feat, xc)
