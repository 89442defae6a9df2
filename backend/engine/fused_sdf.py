"""Fused local networks on the GPU (Triton): blended features of all 39 regions in one kernel.

The torch path (sdf_eval.HeadSdf "dense") materialises (39, N, 96) activations per layer and is bound by
that memory traffic (~90 ms for the 487k points of a 256^3 band on an H100, float32 or float16 alike). Here
one program takes BLOCK points and loops over the regions: positional encoding, the three layers of region
r's network and the weighted sum sum_r softmax_r(-|x - k_r| / sigma) g_r(x) stay on chip; only x in and
the 32 blended features out touch memory. A second small kernel applies the fusion head (32 -> 128 -> 128
-> 1, float32-accurate products) and the sphere prior to the features in the same point order, so one call is two
kernels plus the point sort (in torch the head and prior were ~10 launches a call).

Two modes (`precise`), measured on that band (H100):
- fast (4.9 ms): float16 matrix operands with float32 accumulation, bias and SiLU; the encoding of region r
  from sin/cos of the global coordinates rotated by the anchor's angles (sin(a - b) = sin a cos b -
  cos a sin b: multiply-adds instead of 64 sines and cosines a region). The SDF moves by up to ~41 um.
  HeadSdf evaluates every point within `exact_below` of zero again in the precise mode.
- precise (24 ms): the encoding as the model computes it, and every activation split into float16 high and
  low parts (a = hi + lo to ~22 bits; two products a layer). The shipped weights are float16 values, so the
  products are exact and the result is float32 accurate: max 6.4e-8 m from a float64 evaluation, where the
  torch float32 path is 5.5e-8 m away.
A region whose blend weight is below SKIP_WEIGHT at every point of a block is skipped for that block (fast:
1e-5, ~half of the work on a head's band; precise: 1e-9, at most 3.9e-8 of the mass left out, a few
nanometres at the model's ~0.2 m per unit of mass). Points are sorted into the Morton order of 2 mm cells
first so that each block is compact.

Layout: hidden width 96 is padded to 128 and the 39-wide encoding to 64 with zero weights (Triton tiles are
powers of two; a zero column stays zero through SiLU and meets zero rows in the next layer).
Only the shipped architecture (one hidden-to-hidden layer, float16-exact local weights, a two-hidden-layer
SiLU fusion head) is fused;
`supported()` says whether a model and device can use it. Under TRITON_INTERPRET=1 the same kernel runs on
the CPU (numpy): CPU-only CI tests it.
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from .. import constants

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

SKIP_WEIGHT = {False: 1e-5, True: 1e-9}  # by `precise` (see the module docstring)
BLOCK = 64
NUM_WARPS = 4
FUSION_BLOCK = 32  # the fusion kernel's fastest block (docs/benchmarks.md, "Engine tuning")
ENC_PAD = 64
BRICK = 0.002  # Morton-order cell (m): consecutive points, hence a kernel block's, lie within a few mm
HIDDEN_PAD = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def supported(model, device: torch.device) -> bool:
    cfg = model.cfg
    fusion = [type(m).__name__ for m in model.fusion]
    shape_ok = (cfg.local_layers == 2 and 3 + 6 * cfg.pe_freqs <= ENC_PAD and cfg.local_hidden <= HIDDEN_PAD
                and cfg.feat_dim in (16, 32, 64) and cfg.fusion_hidden <= HIDDEN_PAD
                and fusion == ["Linear", "SiLU", "Linear", "SiLU", "Linear"])
    if triton is None or not shape_ok or not (device.type == "cuda" or INTERPRET):
        return False
    # the precise mode's products are exact only for float16-exact weights (the shipped file stores float16)
    per_model = _PER_MODEL.setdefault(model, {})
    if "float16_exact" not in per_model:
        weights = [model.loc_wx, model.loc_wh[0], model.loc_wo]
        per_model["float16_exact"] = all(bool((w.detach().half().float() == w.detach()).all()) for w in weights)
    return per_model["float16_exact"]


if triton is not None:

    @triton.jit(do_not_specialize=["n_points"])  # one compiled kernel whatever the point count
    def _features_kernel(x_ptr, k_ptr, flip_ptr, col_freq_ptr, col_axis_ptr, col_kind_ptr, rot_ptr,
                         w1_ptr, b1_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr, out_ptr,
                         n_points, inv_sigma, pe_scale, skip_weight,
                         R: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, HP: tl.constexpr, FD: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        px = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0)
        py = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0)
        pz = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0)

        # softmax normaliser over all regions: sum_r exp((d_min - d_r) / sigma)
        ri = tl.arange(0, RP)
        rmask = ri < R
        kx = tl.load(k_ptr + ri * 3 + 0, mask=rmask, other=0.0)
        ky = tl.load(k_ptr + ri * 3 + 1, mask=rmask, other=0.0)
        kz = tl.load(k_ptr + ri * 3 + 2, mask=rmask, other=0.0)
        ddx = px[:, None] - kx[None, :]
        ddy = py[:, None] - ky[None, :]
        ddz = pz[:, None] - kz[None, :]
        dist = tl.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
        dist = tl.where(rmask[None, :], dist, float("inf"))
        dmin = tl.min(dist, axis=1)
        norm = tl.sum(tl.exp((dmin[:, None] - dist) * inv_sigma), axis=1)

        ci = tl.arange(0, EP)
        col_freq = tl.load(col_freq_ptr + ci)
        col_axis = tl.load(col_axis_ptr + ci)
        col_kind = tl.load(col_kind_ptr + ci)
        if not PRECISE:
            # sin/cos of the global coordinates once per point; each region's encoding is then a rotation by
            # its anchor's angles (rot tables, see FusedSdf): multiply-adds instead of 64 sines and cosines
            gx = tl.where(col_axis[None, :] == 0, px[:, None],
                          tl.where(col_axis[None, :] == 1, py[:, None], pz[:, None])) * pe_scale
            base = gx * col_freq[None, :]
            sin_base = tl.sin(base)
            cos_base = tl.cos(base)
        hi = tl.arange(0, HP)
        fi = tl.arange(0, FD)
        acc = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        for r in range(R):
            lx = px - tl.load(k_ptr + r * 3 + 0)
            ly = py - tl.load(k_ptr + r * 3 + 1)
            lz = pz - tl.load(k_ptr + r * 3 + 2)
            weight = tl.exp((dmin - tl.sqrt(lx * lx + ly * ly + lz * lz)) * inv_sigma) / norm
            weight = tl.where(mask, weight, 0.0)
            if tl.max(weight, axis=0) > skip_weight:  # else negligible at every point of the block
                w1 = tl.load(w1_ptr + r * EP * HP + ci[:, None] * HP + hi[None, :])
                wh = tl.load(wh_ptr + r * HP * HP + hi[:, None] * HP + hi[None, :])
                wo = tl.load(wo_ptr + r * HP * FD + hi[:, None] * FD + fi[None, :])
                b1 = tl.load(b1_ptr + r * HP + hi)[None, :]
                bh = tl.load(bh_ptr + r * HP + hi)[None, :]
                bo = tl.load(bo_ptr + r * FD + fi)[None, :]
                if PRECISE:
                    # [xs, sin(2^l pi xs), cos(2^l pi xs)] of xs = (x - k_r) * flip_r * scale, in the model's order
                    # of operations; every operand split into float16 high + low parts (weights are exact float16)
                    xs = lx * tl.load(flip_ptr + r * 3 + 0) * pe_scale
                    ys = ly * tl.load(flip_ptr + r * 3 + 1) * pe_scale
                    zs = lz * tl.load(flip_ptr + r * 3 + 2) * pe_scale
                    coord = tl.where(col_axis[None, :] == 0, xs[:, None],
                                     tl.where(col_axis[None, :] == 1, ys[:, None], zs[:, None]))
                    ang = coord * col_freq[None, :]
                    enc = tl.where(col_kind[None, :] == 0, coord,
                                   tl.where(col_kind[None, :] == 1, tl.sin(ang),
                                            tl.where(col_kind[None, :] == 2, tl.cos(ang), 0.0)))
                    a_hi = enc.to(tl.float16)
                    h = tl.dot(a_hi, w1, tl.dot((enc - a_hi.to(tl.float32)).to(tl.float16), w1)) + b1
                    h = h * tl.sigmoid(h)
                    a_hi = h.to(tl.float16)
                    h = tl.dot(a_hi, wh, tl.dot((h - a_hi.to(tl.float32)).to(tl.float16), wh)) + bh
                    h = h * tl.sigmoid(h)
                    a_hi = h.to(tl.float16)
                    g = tl.dot(a_hi, wo, tl.dot((h - a_hi.to(tl.float32)).to(tl.float16), wo)) + bo
                else:
                    ra = tl.load(rot_ptr + (r * 4 + 0) * EP + ci)
                    rb = tl.load(rot_ptr + (r * 4 + 1) * EP + ci)
                    rp = tl.load(rot_ptr + (r * 4 + 2) * EP + ci)
                    rq = tl.load(rot_ptr + (r * 4 + 3) * EP + ci)
                    enc = ra[None, :] * sin_base + rb[None, :] * cos_base + rp[None, :] * gx + rq[None, :]
                    h = tl.dot(enc.to(tl.float16), w1) + b1
                    h = h * tl.sigmoid(h)
                    h = tl.dot(h.to(tl.float16), wh) + bh
                    h = h * tl.sigmoid(h)
                    g = tl.dot(h.to(tl.float16), wo) + bo
                acc += weight[:, None] * g
        tl.store(out_ptr + offs[:, None] * FD + fi[None, :], acc, mask=mask[:, None])

    @triton.jit(do_not_specialize=["n_points"])
    def _fusion_kernel(feat_ptr, x_ptr, wf1_ptr, bf1_ptr, wf2_ptr, bf2_ptr, wf3_ptr, out_ptr, n_points, bf3,
                       cx, cy, cz, radius, sdf_scale, FD: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr):
        """sdf = |x - c| - radius + sdf_scale * fusion(feat): the model's prior and fusion head. Products in
        "tf32x3" (three TF32 tensor-core products, float32 accuracy: 8e-8 m from torch's float32 on 487k points;
        "ieee" FMA products spilled, 20-46 ms against 0.6 ms, H100)."""
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        fi = tl.arange(0, FD)
        hi = tl.arange(0, HP)
        feat = tl.load(feat_ptr + offs[:, None] * FD + fi[None, :], mask=mask[:, None], other=0.0)
        h = tl.dot(feat, tl.load(wf1_ptr + fi[:, None] * HP + hi[None, :]), input_precision="tf32x3")
        h = h + tl.load(bf1_ptr + hi)[None, :]
        h = h * tl.sigmoid(h)
        h = tl.dot(h, tl.load(wf2_ptr + hi[:, None] * HP + hi[None, :]), input_precision="tf32x3")
        h = h + tl.load(bf2_ptr + hi)[None, :]
        h = h * tl.sigmoid(h)
        res = tl.sum(h * tl.load(wf3_ptr + hi)[None, :], axis=1) + bf3
        dx = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0) - cx
        dy = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0) - cy
        dz = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0) - cz
        sdf = tl.sqrt(dx * dx + dy * dy + dz * dz) - radius + sdf_scale * res
        tl.store(out_ptr + offs, sdf, mask=mask)

    @triton.jit
    def _spread_bits(q):
        """10-bit integers -> the same bits at every third position (Morton interleaving)."""
        q = (q | (q << 16)) & 0x030000FF
        q = (q | (q << 8)) & 0x0300F00F
        q = (q | (q << 4)) & 0x030C30C3
        q = (q | (q << 2)) & 0x09249249
        return q

    @triton.jit(do_not_specialize=["n_points"])
    def _morton_kernel(x_ptr, code_ptr, n_points, ox, oy, oz, inv_cell, BLOCK_N: tl.constexpr):
        """30-bit Morton code of each point's cell (10 bits an axis, cells counted from (ox, oy, oz))."""
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        qx = ((tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0) - ox) * inv_cell).to(tl.int32)
        qy = ((tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0) - oy) * inv_cell).to(tl.int32)
        qz = ((tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0) - oz) * inv_cell).to(tl.int32)
        qx = tl.minimum(tl.maximum(qx, 0), 1023)
        qy = tl.minimum(tl.maximum(qy, 0), 1023)
        qz = tl.minimum(tl.maximum(qz, 0), 1023)
        code = _spread_bits(qx) | (_spread_bits(qy) << 1) | (_spread_bits(qz) << 2)
        tl.store(code_ptr + offs, code, mask=mask)


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out.contiguous()


_PER_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_tables(model, device: torch.device) -> dict[str, torch.Tensor]:
    """The head-independent kernel operands of a model, made once per model and device (a mesh request should
    not pay for re-laying out 2 MB of weights): float16 padded weights, float32 biases, encoding columns."""
    per_model = _PER_MODEL.setdefault(model, {})
    if device not in per_model:
        cfg, s = model.cfg, model.slot
        R, F, nf = cfg.n_regions, cfg.feat_dim, cfg.pe_freqs
        # Encoding columns as model.encoding.positional_encoding lays them out: [xs (3), sin (3 nf), cos (3 nf)],
        # column 3 + 3 l + axis at frequency 2^l pi; kind 0 raw, 1 sin, 2 cos, 3 padding.
        j = torch.arange(3 * nf)
        col_freq = torch.ones(ENC_PAD, dtype=torch.float64)
        col_axis = torch.zeros(ENC_PAD, dtype=torch.long)
        kind = torch.full((ENC_PAD,), 3)
        col_axis[:3], kind[:3] = torch.arange(3), 0
        for k_id, start in ((1, 3), (2, 3 + 3 * nf)):
            col_freq[start : start + 3 * nf] = (2.0 ** (j // 3)) * math.pi
            col_axis[start : start + 3 * nf] = j % 3
            kind[start : start + 3 * nf] = k_id
        with torch.no_grad():
            per_model[device] = {
                "w1": _pad(model.loc_wx[s].float(), (R, ENC_PAD, HIDDEN_PAD)).half().to(device),
                "wh": _pad(model.loc_wh[0][s].float(), (R, HIDDEN_PAD, HIDDEN_PAD)).half().to(device),
                "wo": _pad(model.loc_wo[s].float(), (R, HIDDEN_PAD, F)).half().to(device),
                "bh": _pad(model.loc_bh[0][s].float(), (R, HIDDEN_PAD)).to(device),
                "bo": model.loc_bo[s].float().contiguous().to(device),
                "flip": model.flip.float().contiguous().to(device),
                "col_freq64": col_freq.to(device), "col_freq": col_freq.float().to(device),
                "col_axis": col_axis.to(device), "col_axis32": col_axis.int().to(device),
                "kind": kind.to(device), "kind32": kind.int().to(device),
                # fusion head, (in, out) layout padded to HIDDEN_PAD, float32
                "wf1": _pad(model.fusion[0].weight.float().T, (F, HIDDEN_PAD)).to(device),
                "bf1": _pad(model.fusion[0].bias.float(), (HIDDEN_PAD,)).to(device),
                "wf2": _pad(model.fusion[2].weight.float().T, (HIDDEN_PAD, HIDDEN_PAD)).to(device),
                "bf2": _pad(model.fusion[2].bias.float(), (HIDDEN_PAD,)).to(device),
                "wf3": _pad(model.fusion[4].weight.float()[0], (HIDDEN_PAD,)).to(device),
                "bf3": float(model.fusion[4].bias.float()[0]),
            }
    return per_model[device]


def _brick_order(x: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts points (N,3) by the Morton order of their BRICK-sized cells: compact blocks."""
    code = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    lo = constants.BBOX_MIN
    _morton_kernel[(triton.cdiv(x.shape[0], 1024),)](x, code, x.shape[0], lo[0], lo[1], lo[2], 1.0 / BRICK,
                                                      BLOCK_N=1024)
    return torch.argsort(code)


class FusedSdf:
    """The SDF (N,) of one head: all regions' local networks in the fused kernel, then the fusion head."""

    def __init__(self, model, zr: torch.Tensor, k: torch.Tensor, b1: torch.Tensor):
        """b1: (R, H) first-layer bias with the region codes folded in (sdf_eval.HeadSdf computes it)."""
        cfg = model.cfg
        self.prior = ([float(v) for v in cfg.prior_center], float(cfg.prior_radius), float(cfg.sdf_scale))
        dev = k.device
        R, F = cfg.n_regions, cfg.feat_dim
        self.R, self.F = R, F
        self.inv_sigma, self.pe_scale = 1.0 / cfg.sigma, cfg.pe_scale
        self.k = k[0].float().contiguous()
        t = _model_tables(model, dev)
        self.w1, self.wh, self.wo, self.bh, self.bo, self.flip = t["w1"], t["wh"], t["wo"], t["bh"], t["bo"], t["flip"]
        self.col_freq, self.col_axis, self.col_kind = t["col_freq"], t["col_axis32"], t["kind32"]
        self.fusion = t["wf1"], t["bf1"], t["wf2"], t["bf2"], t["wf3"], t["bf3"]
        with torch.no_grad():
            self.b1 = _pad(b1.float(), (R, HIDDEN_PAD))
            # Region r's column = A sin(base) + B cos(base) + P gx + Q, where gx = scale x_axis, base = freq gx,
            # K = freq scale k_axis and f = the region's flip of that axis (float64 on the device, no host trip):
            # sin(f (base - K)) = f (sin base cos K - cos base sin K), cos(base - K) = cos base cos K + sin base sin K
            kind = t["kind"]
            kk = k[0].double()[:, t["col_axis"]]  # (R, EP)
            f = self.flip.double()[:, t["col_axis"]]
            ang = t["col_freq64"] * cfg.pe_scale * kk
            zero = torch.zeros_like(ang)
            rot_a = torch.where(kind == 1, f * ang.cos(), torch.where(kind == 2, ang.sin(), zero))
            rot_b = torch.where(kind == 1, -f * ang.sin(), torch.where(kind == 2, ang.cos(), zero))
            rot_p = torch.where(kind == 0, f, zero)
            rot_q = torch.where(kind == 0, -f * cfg.pe_scale * kk, zero)
            self.rot = torch.stack([rot_a, rot_b, rot_p, rot_q], 1).float().contiguous()  # (R, 4, EP)

    def __call__(self, x: torch.Tensor, precise: bool) -> torch.Tensor:
        n = x.shape[0]
        out = torch.empty((n,), dtype=torch.float32, device=x.device)
        if n == 0:
            return out
        x = x.float().contiguous()
        order = _brick_order(x)
        xs = x[order]
        feat = torch.empty((n, self.F), dtype=torch.float32, device=x.device)
        _features_kernel[(triton.cdiv(n, BLOCK),)](
            xs, self.k, self.flip, self.col_freq, self.col_axis, self.col_kind, self.rot,
            self.w1, self.b1, self.wh, self.bh, self.wo, self.bo, feat,
            n, self.inv_sigma, self.pe_scale, SKIP_WEIGHT[precise],
            R=self.R, RP=triton.next_power_of_2(self.R), EP=ENC_PAD, HP=HIDDEN_PAD, FD=self.F,
            BLOCK_N=BLOCK, PRECISE=precise, num_warps=NUM_WARPS,
        )
        wf1, bf1, wf2, bf2, wf3, bf3 = self.fusion
        (cx, cy, cz), radius, scale = self.prior
        sdf = torch.empty((n,), dtype=torch.float32, device=x.device)
        _fusion_kernel[(triton.cdiv(n, FUSION_BLOCK),)](feat, xs, wf1, bf1, wf2, bf2, wf3, sdf, n, bf3, cx, cy, cz,
                                                        radius, scale, FD=self.F, HP=HIDDEN_PAD,
                                                        BLOCK_N=FUSION_BLOCK, num_warps=4)
        out[order] = sdf
        return out
