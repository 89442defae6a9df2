"""The hand-written reverse pass of the point field (engine/point_field.py): the gradient in x of the SDF through
the local networks and blend weights, from what the forward pass recorded on a `Tape`.

Only products with the (transposed) weights, no weight gradients and no autograd graph through the local
networks, which also saves autograd's second evaluation of sin and cos (docs/benchmarks.md, "Engine tuning")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sdf_eval import FirstLayer, LocalRecord

if TYPE_CHECKING:
    from ..model.imhead import ImHead


@dataclass
class Tape:
    """What `reverse` needs from a forward pass: the points' offsets from the anchors (P,R,3), their lengths
    (P,R), the blend weights (P,R), and the local networks' record (the per-region loop's, with the folded first
    layers it ran with, or the batched all-regions pass's)."""

    diff: torch.Tensor | None = None
    dist: torch.Tensor | None = None
    w: torch.Tensor | None = None
    first: FirstLayer | None = None  # the folded first layers local_features ran with
    local: LocalRecord = field(default_factory=LocalRecord)  # sdf_eval.local_features' record
    dense: list[tuple] = field(default_factory=list)  # sdf_eval.dense_local_features' record, when it ran


class ReverseWeights:
    """Per network slot, the transposed weights that carry a gradient back through a local network's layers, and
    the positional encoding's derivative (model/encoding.py's layout: x, sin(2^l pi x), cos(2^l pi x))."""

    def __init__(self, model: ImHead):
        cfg = model.cfg
        with torch.no_grad():
            self.wo = [w.t().contiguous() for w in model.loc_wo]
            self.wh = [[wh[s].t().contiguous() for wh in model.loc_wh] for s in range(model.n_slots)]
            # each frequency's factor on the coordinate its sin / cos term encodes, (3 n_freqs, 3)
            freqs = (2.0 ** torch.arange(cfg.pe_freqs, dtype=model.loc_wx.dtype, device=model.loc_wx.device)) * math.pi
            self.freq_chain = torch.kron(freqs[:, None], torch.eye(3, dtype=freqs.dtype, device=freqs.device))
            # For the batched reverse of sdf_eval.dense_local_features, per region (R, ...): the first layer's
            # transposed weight with its columns as (x, cos terms, sin terms) and one zero column more, and
            # d(encoding)/d(x * pe_scale) in that order: the cos terms' column gradients times sin, then the sin
            # terms' times cos, weighted by -freq and +freq onto the coordinate they encode.
            n = 3 * cfg.pe_freqs
            order = [*range(3), *range(3 + n, 3 + 2 * n), *range(3, 3 + n)]
            slots = model.slot.tolist()
            wx = model.loc_wx[slots][:, order].transpose(1, 2)
            self.wx_r = torch.cat([wx, wx.new_zeros(*wx.shape[:2], 1)], 2)
            self.pe_chain = torch.cat([-self.freq_chain, self.freq_chain])
            self.wo_r = torch.stack([self.wo[s] for s in slots])
            self.wh_r = [torch.stack([self.wh[s][i] for s in slots]) for i in range(len(model.loc_wh))]


def reverse(model: ImHead, rw: ReverseWeights, x: torch.Tensor, dfeat: torch.Tensor, tape: Tape
            ) -> torch.Tensor:
    """Gradient in x (P,3) of prior_sdf(x) + a function of the features with gradient dfeat (P,F) in them:
    through each taped region's network and blend weight."""
    m, cfg = model, model.cfg
    assert tape.w is not None and tape.dist is not None and tape.diff is not None, "tape of no forward pass"
    pc = x - m.prior_center
    dx = pc / pc.norm(dim=-1, keepdim=True)
    dw = torch.zeros_like(tape.w)
    silu_backward = torch.ops.aten.silu_backward
    for enc, pre, g in tape.dense:  # every region at every point, batched over regions (R,P,...)
        dw += torch.einsum("pf,rpf->pr", dfeat, g)
        d = torch.bmm(dfeat[None] * tape.w.t()[:, :, None], rw.wo_r)
        for a, wh in zip(reversed(pre), [*reversed(rw.wh_r), rw.wx_r]):
            d = torch.bmm(silu_backward(d, a), wh)
        dxs = torch.baddbmm(d[..., :3], d[..., 3 : enc.shape[-1]].mul_(enc[..., 3:]),
                            rw.pe_chain.expand(len(enc), -1, -1))
        dx += dxs.mul_(m.flip[:, None, :] * cfg.pe_scale).sum(0)
    if tape.local.regions:
        dx.add_(_reverse_local(model, rw, dfeat, tape, dw))
    # blend weights: softmax over the kept logits -|x - k_r| / sigma (left-out ones have w = 0)
    dl = tape.w * (dw - (tape.w * dw).sum(1, keepdim=True))
    # d|x - k_r| / dx = (x - k_r) / |x - k_r|; a point on an anchor takes 0 (no direction), as autograd does
    coef = torch.where(tape.dist > 0, dl / (tape.dist * -cfg.sigma), 0.0)
    return dx.add_(torch.einsum("pr,prc->pc", coef, tape.diff))


def _reverse_local(model: ImHead, rw: ReverseWeights, dfeat: torch.Tensor, tape: Tape, dw: torch.Tensor
                   ) -> torch.Tensor:
    """`reverse` through the per-region loop's networks (sdf_eval.local_features): each region's gradient in
    the shared encoding, summed, then chained to x once (the encoding's derivative: x * pe_scale -> pe_scale,
    sin(f s x) -> f s cos(f s x), cos(f s x) -> -f s sin(f s x)). Writes the blend-weight gradients into dw."""
    cfg = model.cfg
    assert tape.first is not None and tape.w is not None and tape.local.enc is not None, "tape of no local pass"
    enc, n, w1 = tape.local.enc, 3 * cfg.pe_freqs, tape.first.w
    # the folded first layers transposed, with one zero column more: (n,96) x (96,40) products ran faster than
    # (96,39) ones on the 2-core CPU
    w1t = torch.cat([w1.transpose(1, 2), w1.new_zeros(w1.shape[0], w1.shape[2], 1)], 2)
    denc = enc.new_zeros((enc.shape[0], w1t.shape[2]))
    silu_backward = torch.ops.aten.silu_backward
    for r, s, idx, pre, g in tape.local.regions:
        df, wr = (dfeat, tape.w[:, r]) if idx is None else (dfeat[idx], tape.w[idx, r])
        dwr = (df * g).sum(1)
        d = torch.mm(df * wr[:, None], rw.wo[s])
        for a, wh in zip(reversed(pre), [*reversed(rw.wh[s]), w1t[r]]):
            d = torch.mm(silu_backward(d, a), wh)
        if idx is None:
            dw[:, r] = dwr
            denc += d
        else:
            dw[idx, r] = dwr
            denc.index_put_((idx,), d, accumulate=True)
    sin, cos = enc[:, 3 : 3 + n], enc[:, 3 + n : 3 + 2 * n]
    dterms = denc[:, 3 : 3 + n] * cos - denc[:, 3 + n : 3 + 2 * n] * sin
    return torch.addmm(denc[:, :3], dterms, rw.freq_chain).mul_(cfg.pe_scale)
