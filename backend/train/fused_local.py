"""The training step's local networks in Triton: `features_with_jacobian` fused, forward and backward.

`fast_step.features_with_jacobian` runs each of the 39 regions' networks on every query with 3 tangent
columns, so every layer writes and reads (39, B, N, 96) activations and 3x as many tangents (and keeps them
for the backward): the compiled step is bound by that memory traffic. Here nothing of size regions x points x
hidden touches global memory:

- forward: one program per BLOCK points of one head; a cheap first pass over the regions' distances gives the
  softmax statistics (nearest distance, log normaliser, and m = sum_r w_r dlogit_r/dx), then a loop over the
  regions runs encoding and input layer (value and 3 tangents, cast to the hidden layer's operand type at
  once), then the hidden layer in chunks of HC outputs, each fed straight into the output layer with the blend
  folded into its operand (feat += (w h2) @ Wo, tfeat_a += (dw_a h2 + w u2_a) @ Wo), so only the blended
  outputs are accumulated. Out: feat (B, N, F), tfeat (B, N, 3, F) and the per-point statistics (B, N, 5).
- backward: one program per (region, head, chunk of points) looping over point blocks: it recomputes the
  region's forward, back-propagates through the blend (including dw and its own derivative in x and k) and the
  layers (including the silu'' terms of the tangent path), accumulates the weight, bias and code-bias
  gradients in registers (float32) and adds them once per program (atomics: mirrored regions share a slot).
  With CONFIG["bwd_split"] this runs as two passes (PART 1: output and hidden weight gradients; PART 2: input
  layer, code bias and positions), each recomputing the forward, so that a program holds fewer accumulators
  (offline sm_90 compiles: far fewer spills). The cross-region sums the softmax backward needs reduce to
  per-point products of the forward's outputs with the incoming gradients (`_blend_terms`), so every
  (region, point) is independent; the per-region position gradient goes to a (R, B, N, 3) buffer summed in
  torch into dL/dx and dL/dk.

Precision (`lowp`, on under autocast as in the training loop): the input layer's value product in "tf32x3"
(three TF32 products, float32 accurate: fast_step keeps that layer in float32 because bf16 would cut x to
~0.4 mm), its tangents and the input layer's backward products in TF32, the hidden and output layers in bf16
operands with float32 accumulation (what autocast does there), biases, SiLU, blend and every accumulator in
float32. Without autocast every product is float32 ("ieee" in the interpreter, "tf32x3" on a GPU).

Layout: hidden 96 padded to 128, encoding 39 to 64 with zero weights (powers of two for tl.dot; a padded
hidden unit has a = 0, so its value and tangent are 0 and no gradient reaches its zero weights). Only the
shipped local architecture (local_layers 2) is fused. The ops are torch.library custom ops so torch.compile
treats them as opaque kernels; `FusedLocal` is the autograd.Function over them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from ..model import ImHead

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch step is used
    triton = None

ENC_PAD = 64
HIDDEN_PAD = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# forward block and warps, backward block, warps and points per program, backward in two passes (1) or one (0),
# forward hidden-layer chunk, software-pipelining stages; bench_step's --fused-config overrides them for tuning.
# Default: the least spilling configuration compiled offline for sm_90 (docs/dev/gpu_notes.md): forward 128
# points on 8 warps (two warpgroups, wgmma without duplicated rows), backward 16 points on 8 warps in two passes.
CONFIG = {"fwd_block": 128, "fwd_warps": 8, "bwd_block": 16, "bwd_warps": 8, "bwd_points": 4096, "bwd_split": 1,
          "fwd_chunk": 32, "stages": 1}


def unsupported_reason(m: ImHead, device: torch.device | None = None) -> str | None:
    """Why the fused kernels cannot run this model (on this device, if given), or None."""
    cfg = m.cfg
    if triton is None:
        return "the fused step needs Triton, which is not installed"
    if device is not None and not (device.type == "cuda" or INTERPRET):
        return f"the fused step needs a CUDA device (got {device.type}; Triton's interpreter: TRITON_INTERPRET=1)"
    if cfg.local_layers != 2:
        return f"the fused step supports local_layers 2 only (got {cfg.local_layers})"
    if 3 + 6 * cfg.pe_freqs > ENC_PAD or cfg.local_hidden > HIDDEN_PAD or cfg.feat_dim not in (16, 32, 64):
        return (f"the fused step needs pe_freqs <= 10, local_hidden <= {HIDDEN_PAD} and feat_dim 16/32/64 "
                f"(got {cfg.pe_freqs}, {cfg.local_hidden}, {cfg.feat_dim})")
    return None


if triton is not None:

    @triton.jit
    def _encode(lx, ly, lz, fx, fy, fz, col_freq, col_axis, col_kind, pe_scale):
        """enc (BLOCK, EP) of xs = (x - k) * flip * scale in model.encoding's column order, d enc_e / d x_c(e)
        (the only nonzero tangent entry of column e, along its axis c(e)) and d^2 enc_e / d x_c(e)^2."""
        cs = tl.where(col_axis == 0, fx, tl.where(col_axis == 1, fy, fz)) * pe_scale  # d xs_c(e) / d x_c(e)
        loc = tl.where(col_axis[None, :] == 0, lx[:, None], tl.where(col_axis[None, :] == 1, ly[:, None],
                                                                     lz[:, None]))
        coord = loc * cs[None, :]
        ang = coord * col_freq[None, :]
        sn = tl.sin(ang)
        cn = tl.cos(ang)
        kind = col_kind[None, :]
        fr = col_freq[None, :]
        enc = tl.where(kind == 0, coord, tl.where(kind == 1, sn, tl.where(kind == 2, cn, 0.0)))
        den = tl.where(kind == 0, 1.0, tl.where(kind == 1, fr * cn, tl.where(kind == 2, -fr * sn, 0.0)))
        d2 = tl.where(kind == 1, -fr * fr * sn, tl.where(kind == 2, -fr * fr * cn, 0.0))
        return enc, den * cs[None, :], d2 * (cs * cs)[None, :]

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
        """a @ b with float32 accumulation: bf16 operands when LOWP (2: rounded to bf16, multiplied in float32,
        for the interpreter, whose bf16 dot is wrong), else float32 products at PREC."""
        if LOWP == 1:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        elif LOWP == 2:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision=PREC)
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _op(a, LOWP: tl.constexpr):
        """A float32 activation as a hidden/output-layer operand: bf16 when LOWP == 1 (rounded to bf16 and kept
        float32 when LOWP == 2, the interpreter's stand-in), else float32."""
        if LOWP == 1:
            return a.to(tl.bfloat16)
        elif LOWP == 2:
            return a.to(tl.bfloat16).to(tl.float32)
        else:
            return a

    @triton.jit
    def _dot(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
        """a @ b, a already an operand (_op), b a weight tile of the operand type; float32 accumulation."""
        if LOWP == 1:
            return tl.dot(a, b)
        elif LOWP == 2:
            return tl.dot(a, b.to(tl.bfloat16).to(tl.float32), input_precision=PREC)
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _dot_acc(a, b, acc, LOWP: tl.constexpr, PREC: tl.constexpr):
        """acc + a @ b, a a float32 activation (cast here), b a weight tile of the operand type."""
        if LOWP == 1:
            return tl.dot(a.to(tl.bfloat16), b, acc)
        elif LOWP == 2:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                          input_precision=PREC)
        else:
            return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _local_forward(enc, den, col_axis, w1, b1, w2, b2, wo, bo,
                       LOWP: tl.constexpr, PREC_V: tl.constexpr, PREC_T: tl.constexpr, PREC: tl.constexpr):
        """One region's network on a block of points with its 3 tangent columns. Returns the pre-activations,
        silu's and tangents every backward needs: (a1, t1 x3, a2, t2 x3, g, tg x3)."""
        a1 = tl.dot(enc, w1, input_precision=PREC_V) + b1
        t10 = tl.dot(tl.where(col_axis[None, :] == 0, den, 0.0), w1, input_precision=PREC_T)
        t11 = tl.dot(tl.where(col_axis[None, :] == 1, den, 0.0), w1, input_precision=PREC_T)
        t12 = tl.dot(tl.where(col_axis[None, :] == 2, den, 0.0), w1, input_precision=PREC_T)
        h1, s1 = _silu(a1)
        a2 = _mm(h1, w2, LOWP, PREC) + b2
        t20 = _mm(t10 * s1, w2, LOWP, PREC)
        t21 = _mm(t11 * s1, w2, LOWP, PREC)
        t22 = _mm(t12 * s1, w2, LOWP, PREC)
        h2, s2 = _silu(a2)
        g = _mm(h2, wo, LOWP, PREC) + bo
        tg0 = _mm(t20 * s2, wo, LOWP, PREC)
        tg1 = _mm(t21 * s2, wo, LOWP, PREC)
        tg2 = _mm(t22 * s2, wo, LOWP, PREC)
        return a1, t10, t11, t12, a2, t20, t21, t22, g, tg0, tg1, tg2

    @triton.jit(do_not_specialize=["n_points"])
    def _fwd_kernel(x_ptr, k_ptr, cb_ptr, slot_ptr, flip_ptr, col_freq_ptr, col_axis_ptr, col_kind_ptr,
                    w1_ptr, w2_ptr, b2_ptr, wo_ptr, bo_ptr, feat_ptr, tfeat_ptr, stats_ptr,
                    n_points, inv_sigma, pe_scale,
                    R: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, HP: tl.constexpr, FD: tl.constexpr,
                    BLOCK_N: tl.constexpr, HC: tl.constexpr, LOWP: tl.constexpr, PREC_V: tl.constexpr,
                    PREC_T: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        pbase = (b * n_points + offs).to(tl.int64)
        px = tl.load(x_ptr + pbase * 3 + 0, mask=mask, other=0.0)
        py = tl.load(x_ptr + pbase * 3 + 1, mask=mask, other=0.0)
        pz = tl.load(x_ptr + pbase * 3 + 2, mask=mask, other=0.0)

        # softmax statistics over all regions: nearest distance, log normaliser, m_a = sum_r w_r dlogit_r,a
        ri = tl.arange(0, RP)
        rmask = ri < R
        kx = tl.load(k_ptr + (b * R + ri) * 3 + 0, mask=rmask, other=0.0)
        ky = tl.load(k_ptr + (b * R + ri) * 3 + 1, mask=rmask, other=0.0)
        kz = tl.load(k_ptr + (b * R + ri) * 3 + 2, mask=rmask, other=0.0)
        ddx = px[:, None] - kx[None, :]
        ddy = py[:, None] - ky[None, :]
        ddz = pz[:, None] - kz[None, :]
        dist = tl.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
        dist = tl.where(rmask[None, :], dist, float("inf"))
        dmin = tl.min(dist, axis=1)
        e = tl.exp((dmin[:, None] - dist) * inv_sigma)
        norm = tl.sum(e, axis=1)
        wt = e / norm[:, None]
        coef = -wt * inv_sigma / tl.maximum(dist, 1e-30)  # w_r * dlogit_r / d_r
        m0 = tl.sum(coef * ddx, axis=1)
        m1 = tl.sum(coef * ddy, axis=1)
        m2 = tl.sum(coef * ddz, axis=1)
        lognorm = tl.log(norm)
        tl.store(stats_ptr + pbase * 5 + 0, dmin, mask=mask)
        tl.store(stats_ptr + pbase * 5 + 1, lognorm, mask=mask)
        tl.store(stats_ptr + pbase * 5 + 2, m0, mask=mask)
        tl.store(stats_ptr + pbase * 5 + 3, m1, mask=mask)
        tl.store(stats_ptr + pbase * 5 + 4, m2, mask=mask)

        ci = tl.arange(0, EP)
        col_freq = tl.load(col_freq_ptr + ci)
        col_axis = tl.load(col_axis_ptr + ci)
        col_kind = tl.load(col_kind_ptr + ci)
        hi = tl.arange(0, HP)
        fi = tl.arange(0, FD)
        feat = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        tf0 = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        tf1 = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        tf2 = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        for r in range(R):
            s = tl.load(slot_ptr + r).to(tl.int64)
            lx = px - tl.load(k_ptr + (b * R + r) * 3 + 0)
            ly = py - tl.load(k_ptr + (b * R + r) * 3 + 1)
            lz = pz - tl.load(k_ptr + (b * R + r) * 3 + 2)
            dr = tl.sqrt(lx * lx + ly * ly + lz * lz)
            w = tl.where(mask, tl.exp((dmin - dr) * inv_sigma - lognorm), 0.0)
            c = -inv_sigma / tl.maximum(dr, 1e-30)  # dlogit_r / d_r
            dw0 = w * (c * lx - m0)
            dw1 = w * (c * ly - m1)
            dw2 = w * (c * lz - m2)
            enc, den, _ = _encode(lx, ly, lz, tl.load(flip_ptr + r * 3 + 0), tl.load(flip_ptr + r * 3 + 1),
                                  tl.load(flip_ptr + r * 3 + 2), col_freq, col_axis, col_kind, pe_scale)
            # input layer: value ("tf32x3") and tangents, cast at once to the next layer's operand type
            w1 = tl.load(w1_ptr + s * EP * HP + ci[:, None] * HP + hi[None, :])
            a1 = tl.dot(enc, w1, input_precision=PREC_V) + tl.load(cb_ptr + (b * R + r) * HP + hi)[None, :]
            h1, s1 = _silu(a1)
            h1 = _op(h1, LOWP)
            u10 = _op(tl.dot(tl.where(col_axis[None, :] == 0, den, 0.0), w1, input_precision=PREC_T) * s1, LOWP)
            u11 = _op(tl.dot(tl.where(col_axis[None, :] == 1, den, 0.0), w1, input_precision=PREC_T) * s1, LOWP)
            u12 = _op(tl.dot(tl.where(col_axis[None, :] == 2, den, 0.0), w1, input_precision=PREC_T) * s1, LOWP)
            # hidden layer in chunks of HC outputs, each fed straight into the output layer with the blend
            # folded in: feat += (w h2) @ wo + w bo, tfeat_a += (dw_a h2 + w u2_a) @ wo + dw_a bo
            for c in tl.static_range(HP // HC):
                hc = c * HC + tl.arange(0, HC)
                w2 = tl.load(w2_ptr + s * HP * HP + hi[:, None] * HP + hc[None, :])
                a2 = _dot(h1, w2, LOWP, PREC) + tl.load(b2_ptr + s * HP + hc)[None, :]
                h2, s2 = _silu(a2)
                wo = tl.load(wo_ptr + s * HP * FD + hc[:, None] * FD + fi[None, :])
                feat = _dot_acc(w[:, None] * h2, wo, feat, LOWP, PREC)
                tf0 = _dot_acc(dw0[:, None] * h2 + w[:, None] * (_dot(u10, w2, LOWP, PREC) * s2), wo, tf0, LOWP, PREC)
                tf1 = _dot_acc(dw1[:, None] * h2 + w[:, None] * (_dot(u11, w2, LOWP, PREC) * s2), wo, tf1, LOWP, PREC)
                tf2 = _dot_acc(dw2[:, None] * h2 + w[:, None] * (_dot(u12, w2, LOWP, PREC) * s2), wo, tf2, LOWP, PREC)
            bo = tl.load(bo_ptr + s * FD + fi)[None, :]
            feat += w[:, None] * bo
            tf0 += dw0[:, None] * bo
            tf1 += dw1[:, None] * bo
            tf2 += dw2[:, None] * bo
        fo = pbase[:, None] * FD + fi[None, :]
        tl.store(feat_ptr + fo, feat, mask=mask[:, None])
        to = pbase[:, None] * (3 * FD) + fi[None, :]
        tl.store(tfeat_ptr + to, tf0, mask=mask[:, None])
        tl.store(tfeat_ptr + to + FD, tf1, mask=mask[:, None])
        tl.store(tfeat_ptr + to + 2 * FD, tf2, mask=mask[:, None])

    @triton.jit
    def _silu(a):
        """silu(a) and its derivative."""
        sg = tl.sigmoid(a)
        return a * sg, sg * (1 + a * (1 - sg))

    @triton.jit
    def _weight_grad(acc, h, t0, t1, t2, s, g, gt0, gt1, gt2, LOWP: tl.constexpr, PREC: tl.constexpr):
        """acc + the gradient of a layer's weight over a block: its inputs are the values h and the tangents
        t_c silu'(a) = t_c s, its output gradients g and gt_c."""
        acc = _mm_acc(h, g, acc, LOWP, PREC)
        acc = _mm_acc(t0 * s, gt0, acc, LOWP, PREC)
        acc = _mm_acc(t1 * s, gt1, acc, LOWP, PREC)
        return _mm_acc(t2 * s, gt2, acc, LOWP, PREC)

    @triton.jit
    def _silu_back(ga, gt0, gt1, gt2, a, t0, t1, t2):
        """Through h = silu(a), u_c = t_c silu'(a): (dL/da, dL/dt_c) from (dL/dh, dL/du_c)."""
        sg = tl.sigmoid(a)
        s1 = sg * (1 + a * (1 - sg))
        s2 = sg * (1 - sg) * (2 + a * (1 - 2 * sg))
        da = ga * s1 + (gt0 * t0 + gt1 * t1 + gt2 * t2) * s2
        return da, gt0 * s1, gt1 * s1, gt2 * s1

    @triton.jit(do_not_specialize=["n_points"])
    def _bwd_kernel(x_ptr, k_ptr, cb_ptr, slot_ptr, flip_ptr, col_freq_ptr, col_axis_ptr, col_kind_ptr,
                    w1_ptr, w2_ptr, b2_ptr, wo_ptr, bo_ptr, stats_ptr, gf_ptr, gt_ptr, blend_ptr,
                    dd_ptr, dw1_ptr, dw2_ptr, db2_ptr, dwo_ptr, dbo_ptr, dcb_ptr,
                    n_points, points_per_program, inv_sigma, pe_scale,
                    R: tl.constexpr, EP: tl.constexpr, HP: tl.constexpr, FD: tl.constexpr,
                    BLOCK_N: tl.constexpr, PART: tl.constexpr, LOWP: tl.constexpr, PREC_V: tl.constexpr,
                    PREC_T: tl.constexpr, PREC: tl.constexpr):
        r = tl.program_id(0)
        b = tl.program_id(1)
        chunk = tl.program_id(2)
        s = tl.load(slot_ptr + r).to(tl.int64)
        kx = tl.load(k_ptr + (b * R + r) * 3 + 0)
        ky = tl.load(k_ptr + (b * R + r) * 3 + 1)
        kz = tl.load(k_ptr + (b * R + r) * 3 + 2)
        fx = tl.load(flip_ptr + r * 3 + 0)
        fy = tl.load(flip_ptr + r * 3 + 1)
        fz = tl.load(flip_ptr + r * 3 + 2)
        ci = tl.arange(0, EP)
        col_freq = tl.load(col_freq_ptr + ci)
        col_axis = tl.load(col_axis_ptr + ci)
        col_kind = tl.load(col_kind_ptr + ci)
        hi = tl.arange(0, HP)
        fi = tl.arange(0, FD)
        b1 = tl.load(cb_ptr + (b * R + r) * HP + hi)[None, :]
        b2 = tl.load(b2_ptr + s * HP + hi)[None, :]
        bo = tl.load(bo_ptr + s * FD + fi)[None, :]
        acc_w1 = tl.zeros((EP, HP), dtype=tl.float32)
        acc_w2 = tl.zeros((HP, HP), dtype=tl.float32)
        acc_wo = tl.zeros((HP, FD), dtype=tl.float32)
        acc_b1 = tl.zeros((HP,), dtype=tl.float32)
        acc_b2 = tl.zeros((HP,), dtype=tl.float32)
        acc_bo = tl.zeros((FD,), dtype=tl.float32)
        start = chunk * points_per_program
        for i in range(0, points_per_program, BLOCK_N):
            # the region's weights (~72 KB) are read again each block (from cache) instead of held in registers
            # across the loop beside the 28k float32 gradient accumulators
            w1 = tl.load(w1_ptr + s * EP * HP + ci[:, None] * HP + hi[None, :])
            w2 = tl.load(w2_ptr + s * HP * HP + hi[:, None] * HP + hi[None, :])
            wo = tl.load(wo_ptr + s * HP * FD + hi[:, None] * FD + fi[None, :])
            offs = start + i + tl.arange(0, BLOCK_N)
            mask = offs < n_points
            pbase = (b * n_points + offs).to(tl.int64)
            lx = tl.load(x_ptr + pbase * 3 + 0, mask=mask, other=0.0) - kx
            ly = tl.load(x_ptr + pbase * 3 + 1, mask=mask, other=0.0) - ky
            lz = tl.load(x_ptr + pbase * 3 + 2, mask=mask, other=0.0) - kz
            dmin = tl.load(stats_ptr + pbase * 5 + 0, mask=mask, other=0.0)
            lognorm = tl.load(stats_ptr + pbase * 5 + 1, mask=mask, other=0.0)
            m0 = tl.load(stats_ptr + pbase * 5 + 2, mask=mask, other=0.0)
            m1 = tl.load(stats_ptr + pbase * 5 + 3, mask=mask, other=0.0)
            m2 = tl.load(stats_ptr + pbase * 5 + 4, mask=mask, other=0.0)
            # per-point cross-region sums of the softmax backward (see _blend_terms): S, M_0..2
            bs = tl.load(blend_ptr + pbase * 4 + 0, mask=mask, other=0.0)
            bm0 = tl.load(blend_ptr + pbase * 4 + 1, mask=mask, other=0.0)
            bm1 = tl.load(blend_ptr + pbase * 4 + 2, mask=mask, other=0.0)
            bm2 = tl.load(blend_ptr + pbase * 4 + 3, mask=mask, other=0.0)
            go = pbase[:, None] * FD + fi[None, :]
            gf = tl.load(gf_ptr + go, mask=mask[:, None], other=0.0)
            go = pbase[:, None] * (3 * FD) + fi[None, :]
            gt0 = tl.load(gt_ptr + go, mask=mask[:, None], other=0.0)
            gt1 = tl.load(gt_ptr + go + FD, mask=mask[:, None], other=0.0)
            gt2 = tl.load(gt_ptr + go + 2 * FD, mask=mask[:, None], other=0.0)

            dr = tl.maximum(tl.sqrt(lx * lx + ly * ly + lz * lz), 1e-30)
            w = tl.where(mask, tl.exp((dmin - dr) * inv_sigma - lognorm), 0.0)
            c = -inv_sigma / dr
            lp0 = c * lx  # dlogit / dx_a
            lp1 = c * ly
            lp2 = c * lz
            dw0 = w * (lp0 - m0)
            dw1 = w * (lp1 - m1)
            dw2 = w * (lp2 - m2)
            enc, den, d2 = _encode(lx, ly, lz, fx, fy, fz, col_freq, col_axis, col_kind, pe_scale)
            a1, t10, t11, t12, a2, t20, t21, t22, g, tg0, tg1, tg2 = _local_forward(
                enc, den, col_axis, w1, b1, w2, b2, wo, bo, LOWP, PREC_V, PREC_T, PREC)

            # blend: feat = sum_r w_r g_r, tfeat_a = sum_r dw_r,a g_r + w_r tg_r,a
            p = tl.sum(g * gf + tg0 * gt0 + tg1 * gt1 + tg2 * gt2, axis=1)  # dL/dw through g, tg
            q0 = tl.sum(g * gt0, axis=1)  # dL/d dw_a
            q1 = tl.sum(g * gt1, axis=1)
            q2 = tl.sum(g * gt2, axis=1)
            p2 = p + q0 * (lp0 - m0) + q1 * (lp1 - m1) + q2 * (lp2 - m2) - (lp0 * bm0 + lp1 * bm1 + lp2 * bm2)
            glogit = w * (p2 - bs)
            gl0 = w * (q0 - bm0)  # dL/d dlogit_a
            gl1 = w * (q1 - bm1)
            gl2 = w * (q2 - bm2)
            # dlogit = -(x - k) / (|x - k| sigma): d/dx = -(I - u u^T) / (|x - k| sigma), u = (x - k) / |x - k|
            ul = (gl0 * lx + gl1 * ly + gl2 * lz) / (dr * dr)
            dd0 = glogit * lp0 + c * (gl0 - ul * lx)
            dd1 = glogit * lp1 + c * (gl1 - ul * ly)
            dd2 = glogit * lp2 + c * (gl2 - ul * lz)

            # output layer
            gg = w[:, None] * gf + dw0[:, None] * gt0 + dw1[:, None] * gt1 + dw2[:, None] * gt2
            gtg0 = w[:, None] * gt0
            gtg1 = w[:, None] * gt1
            gtg2 = w[:, None] * gt2
            h2, s2 = _silu(a2)
            if PART != 2:  # output layer's weight gradient
                acc_wo = _weight_grad(acc_wo, h2, t20, t21, t22, s2, gg, gtg0, gtg1, gtg2, LOWP, PREC)
                acc_bo += tl.sum(gg, axis=0)
            wot = tl.trans(wo)
            ga2, gt20, gt21, gt22 = _silu_back(_mm(gg, wot, LOWP, PREC), _mm(gtg0, wot, LOWP, PREC),
                                               _mm(gtg1, wot, LOWP, PREC), _mm(gtg2, wot, LOWP, PREC),
                                               a2, t20, t21, t22)
            # hidden layer
            h1, s1 = _silu(a1)
            if PART != 2:  # hidden layer's weight gradient
                acc_w2 = _weight_grad(acc_w2, h1, t10, t11, t12, s1, ga2, gt20, gt21, gt22, LOWP, PREC)
                acc_b2 += tl.sum(ga2, axis=0)
            if PART != 1:  # back through the hidden and input layers: dW1, code bias, positions
                w2t = tl.trans(w2)
                ga1, gt10, gt11, gt12 = _silu_back(_mm(ga2, w2t, LOWP, PREC), _mm(gt20, w2t, LOWP, PREC),
                                                   _mm(gt21, w2t, LOWP, PREC), _mm(gt22, w2t, LOWP, PREC),
                                                   a1, t10, t11, t12)
                # input layer (float32 operands: TF32 under LOWP)
                te0 = tl.where(col_axis[None, :] == 0, den, 0.0)
                te1 = tl.where(col_axis[None, :] == 1, den, 0.0)
                te2 = tl.where(col_axis[None, :] == 2, den, 0.0)
                acc_w1 = tl.dot(tl.trans(enc), ga1, acc_w1, input_precision=PREC_T)
                acc_w1 = tl.dot(tl.trans(te0), gt10, acc_w1, input_precision=PREC_T)
                acc_w1 = tl.dot(tl.trans(te1), gt11, acc_w1, input_precision=PREC_T)
                acc_w1 = tl.dot(tl.trans(te2), gt12, acc_w1, input_precision=PREC_T)
                acc_b1 += tl.sum(ga1, axis=0)
                w1t = tl.trans(w1)
                genc = tl.dot(ga1, w1t, input_precision=PREC_T)
                gte = tl.where(col_axis[None, :] == 0, tl.dot(gt10, w1t, input_precision=PREC_T),
                               tl.where(col_axis[None, :] == 1, tl.dot(gt11, w1t, input_precision=PREC_T),
                                        tl.dot(gt12, w1t, input_precision=PREC_T)))
                v = genc * den + gte * d2  # dL/dx_c(e) through column e's value and its tangent
                dd0 += tl.sum(tl.where(col_axis[None, :] == 0, v, 0.0), axis=1)
                dd1 += tl.sum(tl.where(col_axis[None, :] == 1, v, 0.0), axis=1)
                dd2 += tl.sum(tl.where(col_axis[None, :] == 2, v, 0.0), axis=1)
                do = ((r * tl.num_programs(1) + b) * n_points + offs).to(tl.int64) * 3
                tl.store(dd_ptr + do + 0, dd0, mask=mask)
                tl.store(dd_ptr + do + 1, dd1, mask=mask)
                tl.store(dd_ptr + do + 2, dd2, mask=mask)
        # once per program: mirrored regions share a slot, chunks of one head share a code bias
        if PART != 1:
            tl.atomic_add(dw1_ptr + s * EP * HP + ci[:, None] * HP + hi[None, :], acc_w1)
            tl.atomic_add(dcb_ptr + (b * R + r) * HP + hi, acc_b1)
        if PART != 2:
            tl.atomic_add(dw2_ptr + s * HP * HP + hi[:, None] * HP + hi[None, :], acc_w2)
            tl.atomic_add(dwo_ptr + s * HP * FD + hi[:, None] * FD + fi[None, :], acc_wo)
            tl.atomic_add(db2_ptr + s * HP + hi, acc_b2)
            tl.atomic_add(dbo_ptr + s * FD + fi, acc_bo)

    @triton.jit
    def _mm_acc(a, b, acc, LOWP: tl.constexpr, PREC: tl.constexpr):
        """acc + a^T @ b (a weight gradient over a block of points); LOWP as in _mm."""
        if LOWP == 1:
            return tl.dot(tl.trans(a.to(tl.bfloat16)), b.to(tl.bfloat16), acc)
        elif LOWP == 2:
            return tl.dot(tl.trans(a.to(tl.bfloat16).to(tl.float32)), b.to(tl.bfloat16).to(tl.float32), acc,
                          input_precision=PREC)
        else:
            return tl.dot(tl.trans(a), b, acc, input_precision=PREC)


def _pad(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    out = t.new_zeros(shape, dtype=dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _columns(pe_freqs: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Encoding columns as model.encoding lays them out: [xs (3), sin (3 L), cos (3 L)], column 3 + 3 l + axis
    at frequency 2^l pi; kind 0 raw, 1 sin, 2 cos, 3 padding."""
    j = torch.arange(3 * pe_freqs)
    freq = torch.ones(ENC_PAD, dtype=torch.float64)
    axis = torch.zeros(ENC_PAD, dtype=torch.int32)
    kind = torch.full((ENC_PAD,), 3, dtype=torch.int32)
    axis[:3], kind[:3] = torch.arange(3, dtype=torch.int32), 0
    for k_id, start in ((1, 3), (2, 3 + 3 * pe_freqs)):
        freq[start : start + 3 * pe_freqs] = (2.0 ** (j // 3)) * math.pi
        axis[start : start + 3 * pe_freqs] = (j % 3).int()
        kind[start : start + 3 * pe_freqs] = k_id
    return freq.float().to(device), axis.to(device), kind.to(device)


def _precisions(lowp: bool) -> dict[str, Any]:
    f32 = "ieee" if INTERPRET else "tf32x3"
    if lowp:
        return {"LOWP": 2 if INTERPRET else 1, "PREC_V": f32, "PREC_T": "ieee" if INTERPRET else "tf32", "PREC": f32}
    return {"LOWP": 0, "PREC_V": f32, "PREC_T": f32, "PREC": f32}


def _operands(x: Tensor, k: Tensor, cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor, bo: Tensor,
              pe_freqs: int, lowp: bool) -> dict[str, Tensor]:
    """Kernel operands: float32 (hidden and output weights bf16 under lowp), padded to ENC_PAD / HIDDEN_PAD."""
    S, _, H = w1.shape
    B, R, _ = k.shape
    Fd = wo.shape[-1]
    hdt = torch.bfloat16 if lowp else torch.float32
    freq, axis, kind = _columns(pe_freqs, x.device)
    return {
        "x": x.float().contiguous(), "k": k.float().contiguous(),
        "cb": _pad(cb.float(), (B, R, HIDDEN_PAD)),
        "w1": _pad(w1.float(), (S, ENC_PAD, HIDDEN_PAD)),
        "w2": _pad(w2.to(hdt), (S, HIDDEN_PAD, HIDDEN_PAD), hdt),
        "b2": _pad(b2.float(), (S, HIDDEN_PAD)),
        "wo": _pad(wo.to(hdt), (S, HIDDEN_PAD, Fd), hdt),
        "bo": bo.float().contiguous(),
        "freq": freq, "axis": axis, "kind": kind,
    }


@torch.library.custom_op("imhead::fused_local_fwd", mutates_args=())
def fused_local_fwd(x: Tensor, k: Tensor, cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor, bo: Tensor,
                    slot: Tensor, flip: Tensor, sigma: float, pe_scale: float, pe_freqs: int, lowp: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(feat (B, N, F), tfeat (B, N, 3, F), stats (B, N, 5): nearest distance, log normaliser, m_0..2)."""
    B, N, _ = x.shape
    R = k.shape[1]
    Fd = wo.shape[-1]
    o = _operands(x, k, cb, w1, w2, b2, wo, bo, pe_freqs, lowp)
    feat = x.new_empty((B, N, Fd), dtype=torch.float32)
    tfeat = x.new_empty((B, N, 3, Fd), dtype=torch.float32)
    stats = x.new_empty((B, N, 5), dtype=torch.float32)
    if N == 0:
        return feat, tfeat, stats
    block = CONFIG["fwd_block"]
    _fwd_kernel[(triton.cdiv(N, block), B)](
        o["x"], o["k"], o["cb"], slot.int().contiguous(), flip.float().contiguous(), o["freq"], o["axis"], o["kind"],
        o["w1"], o["w2"], o["b2"], o["wo"], o["bo"], feat, tfeat, stats, N, 1.0 / sigma, pe_scale,
        R=R, RP=triton.next_power_of_2(R), EP=ENC_PAD, HP=HIDDEN_PAD, FD=Fd, BLOCK_N=block, HC=CONFIG["fwd_chunk"],
        num_warps=CONFIG["fwd_warps"], num_stages=CONFIG["stages"], **_precisions(lowp))
    return feat, tfeat, stats


@fused_local_fwd.register_fake
def _fwd_fake(x: Tensor, k: Tensor, cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor, bo: Tensor,
              slot: Tensor, flip: Tensor, sigma: float, pe_scale: float, pe_freqs: int, lowp: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    B, N, _ = x.shape
    Fd = wo.shape[-1]
    return (x.new_empty((B, N, Fd), dtype=torch.float32), x.new_empty((B, N, 3, Fd), dtype=torch.float32),
            x.new_empty((B, N, 5), dtype=torch.float32))


def _blend_terms(feat: Tensor, tfeat: Tensor, stats: Tensor, gf: Tensor, gt: Tensor) -> Tensor:
    """Per point (B, N, 4): S = sum_r w_r P''_r and M_a = sum_r w_r g_r . Gt_a, the cross-region sums of the
    softmax backward, from the forward's outputs: with P_r = g_r . Gf + sum_a tg_r,a . Gt_a the gradient
    reaching w_r through g and tg, and dw_r,a = w_r (l_r,a - m_a) (l = dlogit/dx),
    P''_r = P_r + sum_a (g_r . Gt_a)(l_r,a - m_a) - sum_a l_r,a M_a, and S = feat . Gf + sum_a tfeat_a . Gt_a
    - sum_a m_a M_a (sum_r w_r tg_r,a + sum_r w_r l_r,a g_r = tfeat_a + m_a feat)."""
    M = torch.einsum("bnf,bnaf->bna", feat, gt)
    S = (feat * gf).sum(-1) + (tfeat * gt).sum((-2, -1)) - (stats[..., 2:] * M).sum(-1)
    return torch.cat([S[..., None], M], -1).contiguous()


@torch.library.custom_op("imhead::fused_local_bwd", mutates_args=())
def fused_local_bwd(gf: Tensor, gt: Tensor, feat: Tensor, tfeat: Tensor, stats: Tensor, x: Tensor, k: Tensor,
                    cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor, bo: Tensor, slot: Tensor,
                    flip: Tensor, sigma: float, pe_scale: float, pe_freqs: int, lowp: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, k, cb, w1, w2, b2, wo, bo) in their shapes, float32."""
    B, N, _ = x.shape
    R = k.shape[1]
    S, E, H = w1.shape
    Fd = wo.shape[-1]
    o = _operands(x, k, cb, w1, w2, b2, wo, bo, pe_freqs, lowp)
    gf = gf.float().contiguous()
    gt = gt.float().contiguous()
    with torch.autocast(x.device.type, enabled=False):  # a backward called under autocast: keep these float32
        blend = _blend_terms(feat, tfeat, stats, gf, gt)
    f32 = torch.float32
    dd = x.new_zeros((R, B, N, 3), dtype=f32)
    dw1 = x.new_zeros((S, ENC_PAD, HIDDEN_PAD), dtype=f32)
    dw2 = x.new_zeros((S, HIDDEN_PAD, HIDDEN_PAD), dtype=f32)
    db2 = x.new_zeros((S, HIDDEN_PAD), dtype=f32)
    dwo = x.new_zeros((S, HIDDEN_PAD, Fd), dtype=f32)
    dbo = x.new_zeros((S, Fd), dtype=f32)
    dcb = x.new_zeros((B, R, HIDDEN_PAD), dtype=f32)
    if N > 0:
        block = CONFIG["bwd_block"]
        per = max(block, min(triton.cdiv(N, block) * block, CONFIG["bwd_points"] // block * block))
        # bwd_split: two passes (outer layers' weight gradients; then the input layer, code bias and positions),
        # each recomputing the forward, so that fewer accumulators are held a program. bf16 (autocast) only: with
        # float32 weights the first pass needs 260 KB of shared memory at 16 points / 8 warps (over sm_90's 227
        # KB), the single pass 128 KB
        for part in (1, 2) if CONFIG["bwd_split"] and lowp else (0,):
            _bwd_kernel[(R, B, triton.cdiv(N, per))](
                o["x"], o["k"], o["cb"], slot.int().contiguous(), flip.float().contiguous(), o["freq"], o["axis"],
                o["kind"], o["w1"], o["w2"], o["b2"], o["wo"], o["bo"], stats.contiguous(), gf, gt, blend,
                dd, dw1, dw2, db2, dwo, dbo, dcb, N, per, 1.0 / sigma, pe_scale,
                R=R, EP=ENC_PAD, HP=HIDDEN_PAD, FD=Fd, BLOCK_N=block, PART=part, num_warps=CONFIG["bwd_warps"],
                num_stages=CONFIG["stages"], **_precisions(lowp))
    dx = dd.sum(0)
    dk = -dd.sum(2).transpose(0, 1)
    return (dx, dk.contiguous(), dcb[..., :H].contiguous(), dw1[:, :E, :H].contiguous(),
            dw2[:, :H, :H].contiguous(), db2[:, :H].contiguous(), dwo[:, :H].contiguous(), dbo)


@fused_local_bwd.register_fake
def _bwd_fake(gf: Tensor, gt: Tensor, feat: Tensor, tfeat: Tensor, stats: Tensor, x: Tensor, k: Tensor,
              cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor, bo: Tensor, slot: Tensor,
              flip: Tensor, sigma: float, pe_scale: float, pe_freqs: int, lowp: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    f32 = torch.float32
    return (x.new_empty(x.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), cb.new_empty(cb.shape, dtype=f32),
            w1.new_empty(w1.shape, dtype=f32), w2.new_empty(w2.shape, dtype=f32), b2.new_empty(b2.shape, dtype=f32),
            wo.new_empty(wo.shape, dtype=f32), bo.new_empty(bo.shape, dtype=f32))


class FusedLocal(torch.autograd.Function):
    """features_with_jacobian's (feat, tfeat) from the fused kernels; gradients for x, k, the code bias and the
    local weights (per slot)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor, cb: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, wo: Tensor,
                bo: Tensor, slot: Tensor, flip: Tensor, sigma: float, pe_scale: float, pe_freqs: int,
                lowp: bool) -> tuple[Tensor, Tensor]:
        feat, tfeat, stats = fused_local_fwd(x, k, cb, w1, w2, b2, wo, bo, slot, flip, sigma, pe_scale, pe_freqs,
                                             lowp)
        ctx.save_for_backward(feat, tfeat, stats, x, k, cb, w1, w2, b2, wo, bo, slot, flip)
        ctx.consts = (sigma, pe_scale, pe_freqs, lowp)
        ctx.dtypes = (x.dtype, k.dtype, cb.dtype, w1.dtype, w2.dtype, b2.dtype, wo.dtype, bo.dtype)
        return feat, tfeat

    @staticmethod
    def backward(ctx: Any, gf: Tensor | None, gt: Tensor | None) -> tuple[Tensor | None, ...]:
        feat, tfeat, stats, x, k, cb, w1, w2, b2, wo, bo, slot, flip = ctx.saved_tensors
        gf = torch.zeros_like(feat) if gf is None else gf
        gt = torch.zeros_like(tfeat) if gt is None else gt
        grads = fused_local_bwd(gf, gt, feat, tfeat, stats, x, k, cb, w1, w2, b2, wo, bo, slot, flip, *ctx.consts)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None, None, None, None, None)


def fused_features_with_jacobian(m: ImHead, x: Tensor, zr: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """fast_step.features_with_jacobian from the fused kernels: feat (B, N, F), tfeat (B, N, 3, F), float32.
    Under autocast the hidden and output layers take bf16 operands (as there); otherwise float32 throughout."""
    reason = unsupported_reason(m, x.device)
    if reason is not None:
        raise RuntimeError(reason)
    cfg = m.cfg
    lowp = torch.is_autocast_enabled(x.device.type)
    cb = m._code_bias(zr)
    out = FusedLocal.apply(x, k, cb, m.loc_wx, m.loc_wh[0], m.loc_bh[0], m.loc_wo, m.loc_bo, m.slot, m.flip,
                           float(cfg.sigma), float(cfg.pe_scale), int(cfg.pe_freqs), lowp)
    return out[0], out[1]
