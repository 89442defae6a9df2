"""The fit's outline term (docs/capture.md): the posed head's occluding contour against the foreground mask's
outline, through the mask's signed distance transform.

A contour point is a surface point whose normal is perpendicular to its view ray. It is found from a ray: at
the point of a ray closest to the surface (the minimum of the SDF g along it, so grad g . d = 0) the level
set through that point is seen edge-on, and moving it along the normal by -g lands on the surface with the
same normal, still edge-on (exact for a true distance field). The rays go through fixed pixels on the mask's
outline, moved along the outline's normal until their closest approach is at most a few millimetres from the
surface (a ray deep inside the head has no edge-on minimum), so the points sample the whole outline evenly
and do not change from step to step: no ray-sampling noise.

The point's dependence on the codes and expressions is attached at the solution of the one equation
g(x) = 0 by the implicit function theorem (minimum-norm form, along the normal): x = x* - grad g g(x*) /
|grad g|^2, whose derivative moves the point along the normal by -dg / |grad g|. Sliding along the surface
to stay edge-on moves the projection only along the outline or along the view ray (first order), so the
normal motion is all the distance to the mask's outline sees. The projected point's signed distance to the
mask's outline (positive outside the mask, pixels; bilinear in the pixel position) goes through a Charbonnier
penalty, robust to outline pieces that are not the model's surface."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

CHARBONNIER_PX = 1.0  # quadratic below about this distance, linear above: a few wrong outline pieces cost little
NORMAL_SMOOTH_PX = 1.5  # Gaussian sigma for the outline's normal direction from the distance map


def signed_distance(masks: np.ndarray) -> np.ndarray:
    """(T, H, W) bool -> (T, H, W) float16 distance (px) from each pixel centre to the mask's outline,
    positive outside, negative inside; the outline lies halfway between a foreground and a background pixel.
    Half precision: a 600-frame video's maps are then twice its masks' size."""
    from scipy.ndimage import distance_transform_edt

    out = np.empty(masks.shape, np.float16)
    for t, m in enumerate(masks):
        out[t] = np.where(m, 0.5 - distance_transform_edt(m), distance_transform_edt(~m) - 0.5)
    return out


def outline_anchors(masks: np.ndarray, distance: np.ndarray, count: int, px: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` pixels spread along each mask's outline (ordered by angle about the mask's centroid), with the
    outline's outward unit normal: (T, K, 2) positions, (T, K, 2) normals, (T, K) bool usable. Outline
    pixels at the frame's border are left out (there the frame cuts the foreground). `px`: the footage's
    pixels per reference pixel (fit.REFERENCE_EYE_PX), which the normal's smoothing scales with."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    T, H, W = masks.shape
    pos = np.zeros((T, count, 2), np.float32)
    nrm = np.zeros((T, count, 2), np.float32)
    ok = np.zeros((T, count), bool)
    for t, m in enumerate(masks):
        edge = m & ~binary_erosion(m)
        edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = False, False, False, False
        ys, xs = np.nonzero(edge)
        if len(ys) < count:
            continue
        smooth = gaussian_filter(distance[t].astype(np.float32), NORMAL_SMOOTH_PX * px)
        gy, gx = np.gradient(smooth)
        order = np.argsort(np.arctan2(ys - ys.mean(), xs - xs.mean()), kind="stable")
        pick = order[np.linspace(0, len(order), count, endpoint=False).astype(int)]
        y, x = ys[pick], xs[pick]
        n = np.stack([gx[y, x], gy[y, x]], -1)
        norm = np.linalg.norm(n, axis=-1)
        pos[t] = np.stack([x + 0.5, y + 0.5], -1)
        nrm[t] = n / np.maximum(norm, 1e-9)[:, None]
        ok[t] = norm > 1e-6
    return pos, nrm, ok


def sample(distance: Tensor, pixels: Tensor) -> Tensor:
    """Bilinear values (T, N) of maps (T, H, W) at pixel positions (T, N, 2) (x right, y down, pixel centres at
    half-integers; outside the frame the border's values), differentiable in the positions."""
    T, H, W = distance.shape
    x = (pixels[..., 0] - 0.5).clamp(0, W - 1)
    y = (pixels[..., 1] - 0.5).clamp(0, H - 1)
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    flat = distance.view(T, H * W)

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        return flat.gather(1, yi * W + xi).to(pixels.dtype)

    return (at(y0, x0) * (1 - fx) + at(y0, x1) * fx) * (1 - fy) + (at(y1, x0) * (1 - fx) + at(y1, x1) * fx) * fy


def closest_approach(sdf: Callable[[Tensor], Tensor], origin: Tensor, direction: Tensor, s0: Tensor,
                     before: float = 0.01, after: float = 0.04, samples: int = 21) -> tuple[Tensor, Tensor]:
    """The minimum of sdf(o + s d) over s in [s0 - before, s0 + after]: sampled, then a parabola through the
    smallest sample and its neighbours. s0 is a sphere trace's hit (a ray that enters the head has its
    minimum behind the entry) or its closest sample (a miss). Returns (s, the SDF there, from the parabola).
    No graph."""
    with torch.no_grad():
        h = (before + after) / (samples - 1)
        s = s0[..., None] - before + h * torch.arange(samples, dtype=s0.dtype, device=s0.device)  # (..., S)
        f = sdf(origin[..., None, :] + s[..., None] * direction[..., None, :])
        i = f[..., 1:-1].argmin(-1, keepdim=True) + 1
        fm, f0, fp = f.gather(-1, i - 1), f.gather(-1, i), f.gather(-1, i + 1)
        curve = (fm - 2 * f0 + fp).clamp_min(1e-12)
        shift = (0.5 * (fm - fp) / curve).clamp(-1.0, 1.0)
        return (s.gather(-1, i) + shift * h)[..., 0], (f0 - 0.25 * (fm - fp) * shift)[..., 0]


def attach(x_star: Tensor, grad: Tensor, live: Tensor) -> Tensor:
    """x* with the implicit-function gradient of g(x) = 0 (minimum-norm, along grad): `live` is g(x*, theta)
    with the graph to theta, `grad` = dg/dx at x* (no graph)."""
    return x_star.detach() - grad * (live / grad.square().sum(-1).clamp_min(1e-12))[..., None]


def loss(distance_px: Tensor, weights: Tensor, scale: float, px: float = 1.0) -> Tensor:
    """Weighted mean Charbonnier penalty of outline distances (px), in units of `scale` (the landmark term's
    eye distance) squared, so that a pixel costs about what a landmark's pixel costs; its bend at CHARBONNIER_PX
    reference pixels (`px` of the footage's each: fit.REFERENCE_EYE_PX)."""
    c = CHARBONNIER_PX * px
    rho = c * c * ((1 + (distance_px / c).square()).sqrt() - 1)
    return (weights * rho).sum() / weights.sum().clamp_min(1e-6) / scale ** 2
