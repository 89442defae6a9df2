"""Region-swap locality term: the SDF change on a head's surface, outside a 1 cm margin around region j, when
region j's code (and so its anchor) is replaced by another batch head's.

The held-out eval measures exactly this (`backend.commands.eval.locality`); nothing else in the losses asks for
it. With sigma = 8 mm the blend weight of region j is still 0.02-0.2 one to two centimetres outside it, so a
region network whose output depends strongly on its code moves its neighbours' surface.

Only region j's term of the blend changes under the swap, so the swapped features come from the step's own
blended features: with l_i = -|x - k_i| / sigma, Z = sum_i exp(l_i) and Z' the same with k_j' for k_j,
feat' = (Z / Z') (feat - w_j g_j) + w_j' g_j', where g_j, g_j' are region j's local network at its old and new
code and anchor. That costs two single-region local networks and one fusion head per point instead of all
39 regions again, and it is exact: the other regions' codes, anchors and outputs do not change.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.atlas import labelled_surface_samples
from ..model import ImHead
from ..model.encoding import positional_encoding

MARGIN = 0.01  # m, the eval's
POINTS = 512  # canonical surface points per head that the term sees
GRID_CELL = 0.004  # m, the margin test's distance grid
GRID_SAMPLES = 400_000  # surface samples of the mean head that stand for the regions' surfaces


class SwapLocality:
    """The term, with each region's distance field on the template head: a surface point is outside region
    j's margin where its template position (`surf_template`) is at least MARGIN from region j's surface.
    Not an nn.Module: its grid is a constant, not state (no checkpoint entry, no DDP buffer broadcast)."""

    def __init__(self, template: np.ndarray, faces: np.ndarray, region: np.ndarray, n_regions: int,
                 device: torch.device | str = "cpu", cell: float = GRID_CELL, samples: int = GRID_SAMPLES):
        from scipy.spatial import cKDTree

        pts, label = labelled_surface_samples(template, faces, region, samples)
        lo = pts.min(0) - 2 * MARGIN
        hi = pts.max(0) + 2 * MARGIN
        n = np.ceil((hi - lo) / cell).astype(int) + 1
        axes = [lo[a] + cell * np.arange(n[a]) for a in range(3)]
        zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")  # grid_sample's (D, H, W) = (z, y, x)
        centres = np.stack([xx, yy, zz], -1).reshape(-1, 3)
        far = 3 * MARGIN  # beyond this only "outside" matters: the queries stop there
        grid = np.full((n_regions, len(centres)), far, np.float32)
        for j in range(n_regions):
            if (label == j).any():
                d, _ = cKDTree(pts[label == j]).query(centres, distance_upper_bound=far, workers=-1)
                grid[j] = np.minimum(d, far)
        self.grid = torch.as_tensor(grid, device=device).view(1, n_regions, *n[::-1].tolist())
        self.lo = torch.as_tensor(lo, dtype=torch.float32, device=device)
        self.span = torch.as_tensor((n - 1) * cell, dtype=torch.float32, device=device)

    def region_distance(self, x_template: Tensor, region: Tensor) -> Tensor:
        """Distance (B, N) from template points (B, N, 3) to region[b]'s surface, capped at 3 x MARGIN."""
        B, N, _ = x_template.shape
        u = 2 * (x_template.float() - self.lo) / self.span - 1
        d = F.grid_sample(self.grid, u.view(1, 1, 1, B * N, 3), align_corners=True, padding_mode="border")
        d = d.view(-1, B, N)  # (R, B, N)
        return d.gather(0, region.view(1, B, 1).expand(1, B, N))[0]

    def __call__(self, m: ImHead, zr: Tensor, k: Tensor, feat: Tensor, x: Tensor, x_template: Tensor,
                region: Tensor) -> Tensor:
        """Mean |SDF change| (m) at the canonical surface points x (B, N, 3) outside region[b]'s margin when
        head b takes head b-1's code for region[b]. feat (B, N, F): the step's blended features at x."""
        outside = (self.region_distance(x_template, region) >= MARGIN).to(torch.float32)
        delta = swap_sdf_change(m, zr, k, feat, x, region)
        return (delta.abs() * outside).sum() / outside.sum().clamp_min(1.0)


def region_local(m: ImHead, x: Tensor, z: Tensor, kj: Tensor, region: Tensor) -> Tensor:
    """Region region[b]'s local network at points x (B, N, 3) with code z (B, Z) and anchor kj (B, 3): (B, N, F)."""
    s = m.slot[region]
    local = (x - kj[:, None]) * m.flip[region][:, None]
    h = positional_encoding(local, m.cfg.pe_freqs, m.cfg.pe_scale)
    bias = torch.bmm(z[:, None], m.loc_wz[s]) + m.loc_b[s][:, None]
    h = F.silu(torch.bmm(h, m.loc_wx[s]) + bias)
    for w, b in zip(m.loc_wh, m.loc_bh):
        h = F.silu(torch.bmm(h, w[s]) + b[s][:, None])
    return torch.bmm(h, m.loc_wo[s]) + m.loc_bo[s][:, None]


def swap_sdf_change(m: ImHead, zr: Tensor, k: Tensor, feat: Tensor, x: Tensor, region: Tensor) -> Tensor:
    """f(x; head b with head b-1's code of region[b]) - f(x; head b), (B, N), from the blended features feat
    (B, N, F) at x (B, N, 3) (see the module docstring)."""
    with torch.autocast(x.device.type, enabled=False):  # the change is ~1e-3 of the features: no bf16 here
        dt = m.anchor_bias.dtype
        x, zr, k, feat = x.to(dt), zr.to(dt), k.to(dt), feat.to(dt)
        B = x.shape[0]
        b = torch.arange(B, device=x.device)
        partner = (b - 1) % B
        zj, zj_new = zr[b, region], zr[partner, region]
        kj, kj_new = k[b, region], k[partner, region]
        g = region_local(m, x.repeat(2, 1, 1), torch.cat([zj, zj_new]), torch.cat([kj, kj_new]), region.repeat(2))
        g_old, g_new = g[:B], g[B:]
        logits = m._logits(x, k)  # (B, N, R)
        l_new = -(x - kj_new[:, None]).norm(dim=-1) / m.cfg.sigma
        logits_new = logits.scatter(-1, region.view(B, 1, 1).expand(B, x.shape[1], 1), l_new[..., None])
        lse, lse_new = torch.logsumexp(logits, -1), torch.logsumexp(logits_new, -1)
        idx = region.view(B, 1, 1).expand(B, x.shape[1], 1)
        w_j = torch.exp(logits.gather(-1, idx)[..., 0] - lse)
        w_j_new = torch.exp(l_new - lse_new)
        ratio = torch.exp(lse - lse_new)
        d_feat = (ratio - 1)[..., None] * (feat - w_j[..., None] * g_old) \
            + w_j_new[..., None] * g_new - w_j[..., None] * g_old
        res = m.fusion(torch.cat([feat, feat + d_feat]))[..., 0]
        return m.cfg.sdf_scale * (res[B:] - res[:B])

