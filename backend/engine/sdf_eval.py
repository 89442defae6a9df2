"""Inference-only SDF of one head for extraction: the model's local networks laid out per region.

`HeadSdf(model, zr, k, mode=...)` is a callable (N,3) -> (N,) float32 that computes what `model.sdf(x[None],
zr, k, topk)` computes, without the training-time layout:

- mode "dense": every region at every point, as one batched matrix product per layer over the region axis
  ((R, N, E) @ (R, E, H)); exactly the model's all-39 field (same weights, same order of operations up to
  float32 rounding). Used on CUDA, where one big batched product beats any gather.
- mode "sparse": per point only the regions with the largest blend weights, as many as it takes to leave out
  at most `drop_tol` of the softmax mass (the kept weights renormalised over the kept regions, like the
  model's `topk`); each region's network runs once on the points that keep it (a loop over 39 regions, no
  sort of point-region pairs). On the trained model ~12 regions per near-surface point suffice at 1e-4
  (against 16 for a fixed top 16 that covers only ~70% of them). Points whose approximate |sdf| is below
  `exact_below` are evaluated again with all regions: the left-out mass moves the SDF by up to ~0.2 m per
  unit of mass (measured: 19 um at 1e-4), so with exact_below a few times that, every value near zero, and hence
  every sign, is exact, and a marching-cubes vertex moves by at most error / (2 exact_below) of an edge.

The region codes' contribution to the first layer (zr_j @ W_z + b) is folded into one bias per region once
per head. `hidden_dtype=torch.float16` (dense mode, CUDA) is the fast approximate path: the fused Triton
kernel of engine/fused_sdf.py (float16 operands) where Triton is available, else the torch products with
the two later layers in float16 (the input layer stays float32 there: bf16 would cut local coordinates to
~0.4 mm). Like the sparse mode's left-out mass, the rounding only moves values by tens of micrometres, so
with `exact_below` every point whose approximate |sdf| is below it is evaluated again at float32 accuracy
(the fused kernel's precise mode, or the torch float32 products): every value near zero, and every sign,
is the float32 field's (to its own rounding, ~1e-7 m).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from ..model.encoding import positional_encoding


def heaviest_regions(logits: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend logits (N,R) -> which regions each point keeps (N,R) bool: its largest softmax weights until what
    is left out is <= tol (at least one region), and the mass left out (N,1)."""
    with torch.no_grad():
        ps, order = torch.softmax(logits, dim=1).sort(dim=1, descending=True)
        left = (1.0 - ps.cumsum(1)).clamp_min(0.0)
        keep_sorted = torch.cat([torch.ones_like(left[:, :1], dtype=torch.bool), left[:, :-1] > tol], 1)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        return keep, left.gather(1, keep_sorted.sum(1, keepdim=True) - 1)


@dataclass(frozen=True)
class FirstLayer:
    """The local networks' first layers folded onto one encoding shared by every region (fold_first_layer):
    region r's pre-activations at points x are positional_encoding(x) @ w[r] + b[r]."""

    w: torch.Tensor  # (R,E,H)
    b: torch.Tensor  # (R,H)


def fold_first_layer(model, anchors: torch.Tensor, b1: torch.Tensor) -> FirstLayer:
    """Region r encodes u = flip_r * (x - anchor_r) * pe_scale as [u, sin(f u), cos(f u)]. Per frequency f and
    coordinate, sin(f u) = flip (sin(f s x) cos(f s a) - cos(f s x) sin(f s a)) and cos(f u) = cos(f s x)
    cos(f s a) + sin(f s x) sin(f s a) (s = pe_scale; sin is odd, cos even, flip = +-1), and u is s x flip
    plus a constant: so region r's first layer on its own encoding equals a (R,E,H) weight on the encoding
    of x itself, computed once per point instead of once per point and region (~10% of the CPU extraction's
    time went to the per-region sines, cosines and their bookkeeping). Folded in float64; the weights come
    out float32. anchors (R,3), b1 (R,H): the first-layer biases with the region codes in."""
    cfg = model.cfg
    n = cfg.pe_freqs
    s = cfg.pe_scale
    w1 = model.loc_wx[model.slot].double()  # (R,E,H): rows u (3), sin (3n), cos (3n), freq-major
    flip = model.flip.double()  # (R,3)
    a = anchors.double()
    freqs = (2.0 ** torch.arange(n, dtype=torch.float64, device=a.device)) * math.pi
    beta = (freqs[None, :, None] * (s * a)[:, None, :]).reshape(len(a), 3 * n)  # (R, 3n): f s a
    cb, sb = torch.cos(beta)[..., None], torch.sin(beta)[..., None]
    fl = flip.repeat(1, n)[..., None]  # (R, 3n, 1): each term's coordinate flip
    wx, ws, wc = w1[:, :3], w1[:, 3 : 3 + 3 * n], w1[:, 3 + 3 * n :]
    w = torch.cat([flip[..., None] * wx, fl * cb * ws + sb * wc, cb * wc - fl * sb * ws], 1)
    b = b1.double() - torch.einsum("rc,rch->rh", flip * s * a, wx)
    return FirstLayer(w.float().contiguous(), b.float().contiguous())


@dataclass
class LocalRecord:
    """What a reverse pass needs from local_features: the shared encoding (P,E) and, per evaluated region,
    (region, slot, point indices or None for all, pre-activations of each hidden layer, unweighted output)."""

    enc: torch.Tensor | None = None
    regions: list[tuple] = field(default_factory=list)


def local_features(model, slots: list[int], x: torch.Tensor, first: FirstLayer, w: torch.Tensor,
                   keep: torch.Tensor | None, record: LocalRecord | None = None) -> tuple[torch.Tensor, int]:
    """Blended local features (P,F) at points x (P,3): region r's network (first layer first.w[r], first.b[r];
    later layers of slot slots[r]) on the points that keep it (keep (P,R) bool; None: every point), weighted
    by w (P,R); one matrix product per region and layer. Returns the features and the point-region pairs
    evaluated. Activations are computed in place unless autograd is on or `record` is given (sdf_reverse.reverse
    reads it)."""
    cfg = model.cfg
    inplace = not torch.is_grad_enabled() and record is None
    feat = x.new_zeros((x.shape[0], cfg.feat_dim))
    enc_all = positional_encoding(x, cfg.pe_freqs, cfg.pe_scale)
    if record is not None:
        record.enc = enc_all
    pairs = 0
    for r, s in enumerate(slots):
        idx = None if keep is None else torch.nonzero(keep[:, r]).squeeze(1)
        if idx is not None and idx.numel() == 0:
            continue
        enc, wr = (enc_all, w[:, r]) if idx is None else (enc_all[idx], w[idx, r])
        pre = [torch.addmm(first.b[r], enc, first.w[r])]
        h = F.silu(pre[0], inplace=inplace)
        for wh, bh in zip(model.loc_wh, model.loc_bh):
            pre.append(torch.addmm(bh[s], h, wh[s]))
            h = F.silu(pre[-1], inplace=inplace)
        g = torch.addmm(model.loc_bo[s], h, model.loc_wo[s])
        if record is not None:
            record.regions.append((r, s, idx, pre, g))
        g = g.mul_(wr[:, None]) if inplace else g * wr[:, None]
        # in place also under autograd (the backward needs only the indices). index_put_ with indices unique per
        # call: deterministic (one call for all pairs is not on CPU), and much faster than index_add_ on CPU
        if idx is None:
            feat.add_(g)
        else:
            feat.index_put_((idx,), g, accumulate=True)
        pairs += enc.shape[0]
    return feat, pairs


def dense_local_features(model, x: torch.Tensor, anchors: torch.Tensor, b1: torch.Tensor, w: torch.Tensor,
                         record: list | None = None, layers: tuple | None = None) -> torch.Tensor:
    """local_features with every region at every point, as one batched product per layer over the region axis
    (on a GPU ~20 launches instead of ~600 for 39 regions). `layers`: the per-region weights (w1 (R,E,H),
    [wh (R,H,H)], [bh (R,H)], wo (R,H,F), bo (R,F)), by default the model's by slot; the layers after the
    first may be in a lower precision (HeadSdf's float16 path), the output comes back in float32. `record`
    receives one (encoding (R,P,E), pre-activations [(R,P,H)], unweighted outputs (R,P,F)) entry. Same
    operations as local_features up to float rounding."""
    cfg, s = model.cfg, model.slot
    if layers is None:
        layers = (model.loc_wx[s], [wh[s] for wh in model.loc_wh], [bh[s] for bh in model.loc_bh], model.loc_wo[s],
                  model.loc_bo[s])
    w1, whs, bhs, wo, bo = layers
    inplace = not torch.is_grad_enabled() and record is None
    enc = positional_encoding((x[None] - anchors[:, None]) * model.flip[:, None], cfg.pe_freqs, cfg.pe_scale)
    pre = [torch.baddbmm(b1[:, None], enc, w1)]
    h = F.silu(pre[0], inplace=inplace).to(wo.dtype)
    for wh, bh in zip(whs, bhs):
        pre.append(torch.baddbmm(bh[:, None], h, wh))
        h = F.silu(pre[-1], inplace=inplace)
    g = torch.baddbmm(bo[:, None], h, wo).float()
    if record is not None:
        record.append((enc, pre, g))
    return torch.einsum("pr,rpf->pf", w, g)


class HeadSdf:
    def __init__(self, model, zr: torch.Tensor, k: torch.Tensor, mode: str = "dense", drop_tol: float = 1e-4,
                 exact_below: float = 0.0, hidden_dtype: torch.dtype = torch.float32, fused: bool = True):
        if mode not in ("dense", "sparse"):
            raise ValueError(f"mode must be 'dense' or 'sparse', got {mode!r}")
        if hidden_dtype != torch.float32 and mode != "dense":
            raise ValueError("reduced-precision hidden layers are for the dense (CUDA) mode only")
        self.model, self.mode, self.drop_tol = model, mode, drop_tol
        self.exact_below = exact_below
        cfg = model.cfg
        self.sigma = cfg.sigma
        s = model.slot
        self.slots: list[int] = s.tolist()  # region -> local network
        self.hidden_dtype = hidden_dtype
        with torch.no_grad():
            self.k = k[0].float()  # (R,3)
            self.b1 = (torch.einsum("rz,rzh->rh", zr[0].float(), model.loc_wz[s].float()) + model.loc_b[s]).contiguous()
            self.first = fold_first_layer(model, self.k, self.b1) if mode == "sparse" else None
        # dense mode with float16 hidden layers on CUDA: the fused Triton kernel (engine/fused_sdf.py, float16
        # operands throughout) instead of the per-layer products
        self.fused = None
        if fused and hidden_dtype != torch.float32:  # triton loads only here (it costs a CPU cold start time)
            from . import fused_sdf

            if fused_sdf.supported(model, k.device):
                self.fused = fused_sdf.FusedSdf(model, zr, k, self.b1)
        self.max_dropped = 0.0  # largest blend mass left out so far (sparse mode)
        self.regions_evaluated = 0  # point-region pairs evaluated so far
        self.exact_points = 0  # sparse mode: points re-evaluated with every region (|sdf| < exact_below)
        self._count_lock = threading.Lock()  # extraction calls from several threads on CPU (extract_grid._evaluate)

    @property
    def is_approximate(self) -> bool:
        """Whether `approximate` differs from the float32 all-39 field (sparse regions or float16)."""
        return self.mode == "sparse" or self.hidden_dtype != torch.float32

    def approximate(self, x: torch.Tensor) -> torch.Tensor:
        """The SDF without the exact pass near zero: within the float16 or left-out-mass error of the field
        (measured <= 41 um and 19 um); extraction's coarse levels take it with that error as a margin."""
        with torch.no_grad():
            x = x.float()
            if self.fused is not None:
                self._count(regions=self.k.shape[0] * x.shape[0])
                return self.fused(x, precise=False)
            feat = self._dense(x, self.low) if self.mode == "dense" else self._sparse(x)
            return self.model.sdf_from_features(x, feat)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.float()
            sdf = self.approximate(x)
            if self.is_approximate and self.exact_below > 0:
                near = torch.nonzero(sdf.abs() < self.exact_below).squeeze(1)
                if near.numel():
                    xn = x[near]
                    if self.fused is not None:
                        sdf[near] = self.fused(xn, precise=True)
                    else:
                        sdf[near] = self.model.sdf_from_features(xn, self._dense(xn))
                    self._count(exact=near.numel())
            return sdf

    # The torch path's per-region weights, laid out on first use (the fused kernel has its own layout).
    @cached_property
    def w1(self) -> torch.Tensor:
        return self.model.loc_wx.detach()[self.model.slot].float().contiguous()  # (R,E,H)

    @cached_property
    def wh(self) -> list[torch.Tensor]:
        return [w.detach()[self.model.slot].float().contiguous() for w in self.model.loc_wh]

    @cached_property
    def bh(self) -> list[torch.Tensor]:
        return [b.detach()[self.model.slot].float().contiguous() for b in self.model.loc_bh]

    @cached_property
    def wo(self) -> torch.Tensor:
        return self.model.loc_wo.detach()[self.model.slot].float().contiguous()

    @cached_property
    def bo(self) -> torch.Tensor:
        return self.model.loc_bo.detach()[self.model.slot].float().contiguous()

    @cached_property
    def low(self) -> tuple | None:
        """Reduced-precision copies of the hidden and output layers (the exact path keeps float32)."""
        dt = self.hidden_dtype
        if dt == torch.float32:
            return None
        return [w.to(dt) for w in self.wh], [b.to(dt) for b in self.bh], self.wo.to(dt), self.bo.to(dt)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # direct differences, not the |x|^2 + |k|^2 - 2 x.k matrix-product form (cancellation near an anchor)
        return torch.cdist(x, self.k, compute_mode="donot_use_mm_for_euclid_dist").neg_().div_(self.sigma)

    def _dense(self, x: torch.Tensor, low: tuple | None = None) -> torch.Tensor:
        """All regions at every point; `low`: the reduced-precision hidden/output layers instead of float32."""
        wh, bh, wo, bo = low if low is not None else (self.wh, self.bh, self.wo, self.bo)
        w = torch.softmax(self._logits(x), dim=1)  # (N,R)
        self._count(regions=self.k.shape[0] * x.shape[0])
        return dense_local_features(self.model, x, self.k, self.b1, w, layers=(self.w1, wh, bh, wo, bo))

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        keep, dropped = heaviest_regions(logits, self.drop_tol)
        if dropped.numel():
            self._count(dropped=float(dropped.max()))
        w = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=1)  # renormalised over kept
        assert self.first is not None  # folded in __init__ for the sparse mode
        feat, pairs = local_features(self.model, self.slots, x, self.first, w, keep)
        self._count(regions=pairs)
        return feat

    def _count(self, regions: int = 0, exact: int = 0, dropped: float = 0.0) -> None:
        with self._count_lock:
            self.regions_evaluated += regions
            self.exact_points += exact
            self.max_dropped = max(self.max_dropped, dropped)
