"""The extraction's per-level cell test (`extract_sparse._may_change_sign`) as one Triton kernel on the GPU.

In torch the test is ~50 launches a level (edge slopes, per-cell bound, sign mix, and the covering test over
(cells x check points x corners) in bounded pieces) and reads a (cells, 125, 8) broadcast through memory; at
256^3 the three levels cost ~150 launches and ~1.3 ms of reductions. Here one program takes BLOCK cells,
keeps their 8 corner values in registers and loops over the check points. The arithmetic is the torch
path's, operation for operation, with multiply-add contraction off (`enable_fp_fusion=False`), so the
covering decisions are the same; the slope's norm may differ in the last bit (a different summation), which
can only move a per-cell bound by one rounding. Under TRITON_INTERPRET=1 it runs on the CPU (CI tests it).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: extract keeps the torch path
    triton = None

BLOCK = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit(do_not_specialize=["n_cells", "n_check"])
    def _cell_test_kernel(v_ptr, dist_ptr, keep_ptr, bound_ptr, slope_max_ptr, n_cells, n_check, side,
                          lipschitz, slope_margin, error, BLOCK_N: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_cells
        ci = tl.arange(0, 8)
        v = tl.load(v_ptr + offs[:, None] * 8 + ci[None, :], mask=mask[:, None], other=0.0)  # (B, 8)
        v0 = tl.load(v_ptr + offs * 8 + 0, mask=mask, other=0.0)
        v1 = tl.load(v_ptr + offs * 8 + 1, mask=mask, other=0.0)
        v2 = tl.load(v_ptr + offs * 8 + 2, mask=mask, other=0.0)
        v3 = tl.load(v_ptr + offs * 8 + 3, mask=mask, other=0.0)
        v4 = tl.load(v_ptr + offs * 8 + 4, mask=mask, other=0.0)
        v5 = tl.load(v_ptr + offs * 8 + 5, mask=mask, other=0.0)
        v6 = tl.load(v_ptr + offs * 8 + 6, mask=mask, other=0.0)
        v7 = tl.load(v_ptr + offs * 8 + 7, mask=mask, other=0.0)
        # per axis the steepest of its 4 parallel edges (mc.EDGES, Bourke numbering)
        sx = tl.maximum(tl.maximum(tl.abs(v0 - v1), tl.abs(v2 - v3)), tl.maximum(tl.abs(v4 - v5), tl.abs(v6 - v7)))
        sy = tl.maximum(tl.maximum(tl.abs(v1 - v2), tl.abs(v3 - v0)), tl.maximum(tl.abs(v5 - v6), tl.abs(v7 - v4)))
        sz = tl.maximum(tl.maximum(tl.abs(v0 - v4), tl.abs(v1 - v5)), tl.maximum(tl.abs(v2 - v6), tl.abs(v3 - v7)))
        slope = tl.sqrt(sx * sx + sy * sy + sz * sz) / side
        slope = tl.where(mask, slope, 0.0)
        bound = tl.maximum(slope_margin * slope, lipschitz)
        mixed = (tl.min(v, axis=1) < 0) & (tl.max(v, axis=1) >= 0)
        absv = tl.abs(v) - error
        worst = tl.full((BLOCK_N,), float("inf"), tl.float32)
        for p in range(n_check):  # every check point needs a corner whose |value| outruns L x distance
            d = tl.load(dist_ptr + p * 8 + ci)
            worst = tl.minimum(worst, tl.max(absv - bound[:, None] * d[None, :], axis=1))
        keep = mixed | (worst <= 0)
        tl.store(keep_ptr + offs, keep.to(tl.int8), mask=mask)
        tl.store(bound_ptr + offs, bound, mask=mask)
        tl.atomic_max(slope_max_ptr, tl.max(slope, axis=0))


def cell_test(corner_values: torch.Tensor, dist: torch.Tensor, side: float, lipschitz: float, slope_margin: float,
              error: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """corner values (M,8) float32 (within `error` of the field), check-point distances (P,8) float32 (already
    x side, as the torch path scales them) -> (keep (M,) bool, per-cell bound (M,), largest slope (0-d)); see
    extract_sparse._may_change_sign."""
    m = corner_values.shape[0]
    v = corner_values.float().contiguous()
    keep = torch.empty(m, dtype=torch.int8, device=v.device)
    bound = torch.empty(m, dtype=torch.float32, device=v.device)
    slope_max = torch.zeros(1, dtype=torch.float32, device=v.device)  # slopes are >= 0
    _cell_test_kernel[(triton.cdiv(m, BLOCK),)](v, dist.float().contiguous(), keep, bound, slope_max, m,
                                                 dist.shape[0], float(side), float(lipschitz), float(slope_margin),
                                                 float(error), BLOCK_N=BLOCK, enable_fp_fusion=False)
    return keep.bool(), bound, slope_max[0]
