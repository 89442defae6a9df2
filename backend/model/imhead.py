"""imHead network: 39 local SDF networks in anchor frames, fused into one signed distance field.

Shapes: B heads, N points, R = 39 regions, Z = 32 region-code size, F = local feature size.
All coordinates are metres in the canonical frame (+Y up, face toward +Z). The network is untrained-safe:
its geometric initialisation is a sphere of `prior_radius` around `prior_center` (the fusion network's last
layer starts at zero and adds a residual to that sphere's exact SDF), so meshing works before training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import constants
from .encoding import encoded_dim, positional_encoding


@dataclass
class ImHeadConfig:
    n_regions: int = constants.N_REGIONS
    id_dim: int = constants.ID_DIM
    region_dim: int = constants.REGION_DIM
    n_expressions: int = constants.N_EXPRESSIONS
    # [a, b]: region b reuses region a's local network and LandmarkNet with x -> -x.
    mirror_pairs: list[list[int]] = field(default_factory=list)
    sigma: float = 0.008  # blend temperature (m): w_j = softmax(-|x - k_j| / sigma)
    pe_freqs: int = 6
    pe_scale: float = 10.0  # local coordinates are multiplied by this before encoding
    local_hidden: int = 96
    local_layers: int = 2  # hidden layers per local network
    feat_dim: int = 32
    fusion_hidden: int = 128
    dec_hidden: int = 512
    lm_hidden: int = 64
    lm_scale: float = 0.01  # LandmarkNet offsets are in centimetres
    warp_hidden: int = 256
    warp_layers: int = 4
    warp_pe_freqs: int = 6
    warp_id_dim: int = 32
    warp_scale: float = 0.01  # warp output units (m)
    tmpl_hidden: int = 128
    tmpl_pe_freqs: int = 4
    global_pe_scale: float = 5.0  # head-scale coordinates (about +-0.2 m) to about +-1
    sdf_scale: float = 0.1  # fusion output units (m)
    prior_center: list[float] = field(default_factory=lambda: [0.0, -0.01, 0.02])
    prior_radius: float = 0.1

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for pair in self.mirror_pairs:
            a, b = (int(v) for v in pair)
            if not (0 <= a < self.n_regions and 0 <= b < self.n_regions) or a == b or a in seen or b in seen:
                raise ValueError(f"invalid mirror pair {pair} for {self.n_regions} regions")
            seen.update((a, b))
        self.mirror_pairs = [[int(a), int(b)] for a, b in self.mirror_pairs]
        self.prior_center = [float(v) for v in self.prior_center]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ImHeadConfig":
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ImHeadConfig fields: {sorted(unknown)}")
        return cls(**data)


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _mlp(sizes: list[int], zero_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        last = nn.Linear(sizes[i], sizes[i + 1])
        layers.append(last)
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


def _fibonacci_sphere(n: int, center: Tensor, radius: float) -> Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    pts = torch.stack([torch.sin(phi) * torch.cos(theta), torch.cos(phi), torch.sin(phi) * torch.sin(theta)], -1)
    return (center.double() + radius * pts).float()


class ImHead(nn.Module):
    # register_buffer()'s tensors, declared for the type checker (nn.Module's __getattr__ types them Tensor | Module)
    slot: Tensor
    flip: Tensor
    prior_center: Tensor

    def __init__(self, cfg: ImHeadConfig, anchor_init: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        R, Z, H, Fd = cfg.n_regions, cfg.region_dim, cfg.local_hidden, cfg.feat_dim

        # Region -> network slot; the second member of a mirror pair reuses the first's slot, x flipped.
        slot = list(range(R))
        flip = torch.ones(R, 3)
        members = sorted({b for _, b in cfg.mirror_pairs})
        for a, b in cfg.mirror_pairs:
            flip[b, 0] = -1.0
        owners = [r for r in range(R) if r not in members]
        slot_of_owner = {r: i for i, r in enumerate(owners)}
        for r in owners:
            slot[r] = slot_of_owner[r]
        for a, b in cfg.mirror_pairs:
            slot[b] = slot_of_owner[a]
        S = len(owners)
        self.n_slots = S
        self.register_buffer("slot", torch.tensor(slot, dtype=torch.long), persistent=False)
        self.register_buffer("flip", flip, persistent=False)

        # DecNet: z_id -> 39 region codes.
        self.decnet = _mlp([cfg.id_dim, cfg.dec_hidden, cfg.dec_hidden, R * Z], zero_last=False)

        # LandmarkNet: one small MLP per slot applied to its own code only, plus a mean anchor per region.
        if anchor_init is None:
            anchor_init = _fibonacci_sphere(R, torch.tensor(cfg.prior_center), 0.8 * cfg.prior_radius)
        if anchor_init.shape != (R, 3):
            raise ValueError(f"anchor_init must be ({R}, 3), got {tuple(anchor_init.shape)}")
        self.anchor_bias = nn.Parameter(anchor_init.detach().clone().float())
        self.lm_w1 = _uniform((S, Z, cfg.lm_hidden), Z)
        self.lm_b1 = _uniform((S, cfg.lm_hidden), Z)
        self.lm_w2 = nn.Parameter(torch.zeros(S, cfg.lm_hidden, 3))
        self.lm_b2 = nn.Parameter(torch.zeros(S, 3))

        # Local networks g_j(gamma(x - k_j), z_j), all slots batched along a leading axis.
        E = encoded_dim(cfg.pe_freqs)
        self.loc_wx = _uniform((S, E, H), E + Z)
        self.loc_wz = _uniform((S, Z, H), E + Z)
        self.loc_b = _uniform((S, H), E + Z)
        self.loc_wh = nn.ParameterList([_uniform((S, H, H), H) for _ in range(cfg.local_layers - 1)])
        self.loc_bh = nn.ParameterList([_uniform((S, H), H) for _ in range(cfg.local_layers - 1)])
        self.loc_wo = _uniform((S, H, Fd), H)
        self.loc_bo = _uniform((S, Fd), H)

        # FusionNet on blended features -> residual on the prior sphere's SDF.
        self.fusion = _mlp([Fd, cfg.fusion_hidden, cfg.fusion_hidden, 1], zero_last=True)

        # Correspondence head: (blended feature, gamma(x_can)) -> offset to the mean neutral head.
        self.tmpl = _mlp([Fd + encoded_dim(cfg.tmpl_pe_freqs), cfg.tmpl_hidden, cfg.tmpl_hidden, 3], zero_last=True)

        # Deformer: (gamma(x), z_exp, id projection) -> per-expression displacement basis A (53, 3);
        # dx = A . z_exp, so a neutral expression is exactly the identity map.
        self.warp_id = nn.Linear(cfg.id_dim, cfg.warp_id_dim)
        wsizes = [encoded_dim(cfg.warp_pe_freqs) + cfg.n_expressions + cfg.warp_id_dim]
        wsizes += [cfg.warp_hidden] * cfg.warp_layers + [cfg.n_expressions * 3]
        self.warp_net = _mlp(wsizes, zero_last=True)

        self.register_buffer("prior_center", torch.tensor(cfg.prior_center), persistent=False)

    # ---------------------------------------------------------------- identity -> regions -> anchors
    # DecNet and LandmarkNet are tiny and run in full precision even under autocast: a bf16 anchor would be
    # quantised to ~0.5 mm.
    def region_codes(self, z_id: Tensor) -> Tensor:
        """(B, 256) -> (B, 39, 32)."""
        with torch.autocast(z_id.device.type, enabled=False):
            zr = self.decnet(z_id.to(self.anchor_bias.dtype))
        return zr.view(z_id.shape[0], self.cfg.n_regions, self.cfg.region_dim)

    def anchors(self, zr: Tensor) -> Tensor:
        """(B, 39, 32) -> (B, 39, 3); anchor j depends on zr[:, j] only."""
        s = self.slot
        with torch.autocast(zr.device.type, enabled=False):
            zr = zr.to(self.anchor_bias.dtype)
            h = F.silu(torch.einsum("brz,rzh->brh", zr, self.lm_w1[s]) + self.lm_b1[s])
            off = torch.einsum("brh,rhc->brc", h, self.lm_w2[s]) + self.lm_b2[s]
            return self.anchor_bias + self.cfg.lm_scale * off * self.flip

    def decode(self, z_id: Tensor) -> tuple[Tensor, Tensor]:
        zr = self.region_codes(z_id)
        return zr, self.anchors(zr)

    # ---------------------------------------------------------------- blending
    def _logits(self, x: Tensor, k: Tensor) -> Tensor:
        d = (x[:, :, None, :] - k[:, None, :, :]).norm(dim=-1)
        return -d / self.cfg.sigma

    def blend_weights(self, x: Tensor, k: Tensor) -> Tensor:
        """(B, N, 3), (B, 39, 3) -> (B, N, 39) softmax(-|x - k_j| / sigma)."""
        return torch.softmax(self._logits(x, k), dim=-1)

    def topk_weights(self, x: Tensor, k: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest `topk` regions per point: (index (B,N,K), renormalised weights (B,N,K), dropped mass (B,N)).

        The kept weights are a softmax over the kept logits only, so they do not depend (even in
        rounding) on any region outside the top k; `dropped` is the full-softmax mass left out."""
        logits = self._logits(x, k)
        top, idx = logits.topk(topk, dim=-1)
        dropped = 1.0 - torch.softmax(logits, dim=-1).gather(-1, idx).sum(-1)
        return idx, torch.softmax(top, dim=-1), dropped.clamp_min(0.0)

    # ---------------------------------------------------------------- local networks
    def _code_bias(self, zr: Tensor) -> Tensor:
        s = self.slot
        with torch.autocast(zr.device.type, enabled=False):
            return torch.einsum("brz,rzh->brh", zr, self.loc_wz[s]) + self.loc_b[s]  # (B, R, H)

    def _local_dense(self, x: Tensor, zr: Tensor, k: Tensor) -> Tensor:
        """Every region at every point: (B, N, R, F)."""
        s = self.slot
        local = (x[:, :, None, :] - k[:, None, :, :]) * self.flip
        h = positional_encoding(local, self.cfg.pe_freqs, self.cfg.pe_scale)
        with torch.autocast(x.device.type, enabled=False):  # input layer in full precision: bf16 would
            h = torch.einsum("bnre,reh->bnrh", h, self.loc_wx[s]) + self._code_bias(zr)[:, None]  # cut x to ~0.4 mm
        h = F.silu(h)
        for w, b in zip(self.loc_wh, self.loc_bh):
            h = F.silu(torch.einsum("bnrh,rhg->bnrg", h, w[s]) + b[s])
        return torch.einsum("bnrh,rhf->bnrf", h, self.loc_wo[s]) + self.loc_bo[s]

    def _local_pairs(self, x: Tensor, zr: Tensor, k: Tensor, bi: Tensor, ni: Tensor, ri: Tensor) -> Tensor:
        """Region ri[p] at point (bi[p], ni[p]) for a flat list of pairs: (P, F). Pairs are grouped by
        region so each region's weights run as one matrix product."""
        order = torch.argsort(ri, stable=True)
        bi, ni, ri = bi[order], ni[order], ri[order]
        local = (x[bi, ni] - k[bi, ri]) * self.flip[ri]
        enc = positional_encoding(local, self.cfg.pe_freqs, self.cfg.pe_scale)
        zb = self._code_bias(zr)[bi, ri]
        counts = torch.bincount(ri, minlength=self.cfg.n_regions).tolist()
        outs, start = [], 0
        for r, c in enumerate(counts):
            if c == 0:
                continue
            s = int(self.slot[r])
            sl = slice(start, start + c)
            with torch.autocast(x.device.type, enabled=False):
                h = F.silu(enc[sl] @ self.loc_wx[s] + zb[sl])
            for w, b in zip(self.loc_wh, self.loc_bh):
                h = F.silu(h @ w[s] + b[s])
            outs.append(h @ self.loc_wo[s] + self.loc_bo[s])
            start += c
        out_sorted = torch.cat(outs, 0)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out

    def features(self, x: Tensor, zr: Tensor, k: Tensor, topk: int | None = None) -> Tensor:
        """Blended local features (B, N, F); with `topk`, only each point's nearest regions are evaluated."""
        self._check(x, zr, k)
        if topk is None or topk >= self.cfg.n_regions:
            w = self.blend_weights(x, k)
            return (w[..., None] * self._local_dense(x, zr, k)).sum(2)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        B, N, _ = x.shape
        idx, w, _ = self.topk_weights(x, k, topk)
        bi = torch.arange(B, device=x.device)[:, None, None].expand(B, N, topk).reshape(-1)
        ni = torch.arange(N, device=x.device)[None, :, None].expand(B, N, topk).reshape(-1)
        g = self._local_pairs(x, zr, k, bi, ni, idx.reshape(-1))
        return (w.reshape(-1, 1).to(g.dtype) * g).view(B, N, topk, -1).sum(2)

    # ---------------------------------------------------------------- outputs
    def prior_sdf(self, x: Tensor) -> Tensor:
        return (x - self.prior_center).norm(dim=-1) - self.cfg.prior_radius

    def sdf(self, x: Tensor, zr: Tensor, k: Tensor, topk: int | None = None) -> Tensor:
        """Canonical points (B, N, 3) -> signed distance (B, N), negative inside."""
        return self.sdf_and_features(x, zr, k, topk)[0]

    def sdf_and_features(self, x: Tensor, zr: Tensor, k: Tensor, topk: int | None = None) -> tuple[Tensor, Tensor]:
        """SDF (B, N) and the blended features (B, N, F) it was fused from (the template head reuses them)."""
        feat = self.features(x, zr, k, topk)
        return self.sdf_from_features(x, feat), feat

    def sdf_from_features(self, x: Tensor, feat: Tensor) -> Tensor:
        """The prior sphere plus the fusion head on blended features (..., F) at points (..., 3). The small
        fusion head runs in float32 even under autocast: SDF residuals need more than bf16."""
        with torch.autocast(x.device.type, enabled=False):
            res = self.fusion(feat.to(cast(nn.Linear, self.fusion[0]).weight.dtype)).squeeze(-1)
        return self.prior_sdf(x) + self.cfg.sdf_scale * res.to(x.dtype)

    def template(self, x_can: Tensor, zr: Tensor, k: Tensor, topk: int | None = None) -> Tensor:
        """Canonical points (B, N, 3) -> their position on the mean neutral head (B, N, 3)."""
        feat = self.features(x_can, zr, k, topk)
        return self.template_from_features(x_can, feat)

    def template_from_features(self, x_can: Tensor, feat: Tensor) -> Tensor:
        enc = positional_encoding(x_can, self.cfg.tmpl_pe_freqs, self.cfg.global_pe_scale)
        with torch.autocast(x_can.device.type, enabled=False):
            dt = cast(nn.Linear, self.tmpl[0]).weight.dtype
            off = self.tmpl(torch.cat([feat.to(dt), enc.to(dt)], -1))
        return x_can + self.cfg.lm_scale * off.to(x_can.dtype)

    def warp(self, x: Tensor, z_exp: Tensor, z_id: Tensor) -> Tensor:
        """Backward warp: posed points (B, N, 3), expression weights (B, 53), identity (B, 256) -> dx with
        x_can = x + dx. Exactly zero for a neutral expression."""
        if x.dim() != 3 or z_exp.shape != (x.shape[0], self.cfg.n_expressions):
            raise ValueError(f"warp: bad shapes x {tuple(x.shape)}, z_exp {tuple(z_exp.shape)}")
        B, N, _ = x.shape
        enc = positional_encoding(x, self.cfg.warp_pe_freqs, self.cfg.global_pe_scale)
        cond = torch.cat([z_exp, self.warp_id(z_id)], -1)[:, None].expand(B, N, -1)
        basis = self.warp_net(torch.cat([enc, cond.to(enc.dtype)], -1)).view(B, N, self.cfg.n_expressions, 3)
        return self.cfg.warp_scale * torch.einsum("bnec,be->bnc", basis, z_exp.to(basis.dtype)).to(x.dtype)

    def _check(self, x: Tensor, zr: Tensor, k: Tensor) -> None:
        R, Z = self.cfg.n_regions, self.cfg.region_dim
        B = x.shape[0]
        if x.dim() != 3 or x.shape[-1] != 3 or zr.shape != (B, R, Z) or k.shape != (B, R, 3):
            raise ValueError(
                f"expected x (B,N,3), zr (B,{R},{Z}), k (B,{R},3); got {tuple(x.shape)}, "
                f"{tuple(zr.shape)}, {tuple(k.shape)}"
            )
