"""The fit's photometric term (docs/capture.md): photo-consistency of skin points between consecutive frames.

A fixed set of template vertices spread over the face's skin is found on the fitted identity's surface and
carried to every frame's posed head exactly as the landmarks are (fit.py: Gauss-Newton solves with gradients
attached by implicit differentiation at the surface point). Each point's colour is read from the slightly
blurred frame at its projection (bilinear, so differentiable in the pixel position); the loss is a robust
(Charbonnier) distance between the colours one skin point shows in consecutive frames where it faces the
camera in both. The gradient reaches pose, expressions and identity through d pixel / d point and the image
gradient.

Why consecutive frames and no albedo: the head turns under lights fixed to the camera, so one skin point's
shading changes with the turn; between neighbouring frames it changes little, while a shared per-point
albedo would have to explain the whole turn's shading change (an albedo-and-lighting model would, but its
normals need second derivatives of the SDF). A photo (one frame) has no pair: the term is then zero."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# regions whose vertices are not skin seen from outside (inside the mouth, the eyeballs, inside the nostrils)
HIDDEN_REGIONS = ("mouth interior", "left eyeball", "right eyeball", "left nostril", "right nostril")
FACE_MIN = np.array([-0.07, -0.10, 0.04])  # model frame, metres: in front of the ears, brow to chin
FACE_MAX = np.array([0.07, 0.07, 0.20])
BLUR_PX = 1.0  # Gaussian sigma: a basin for the image gradient wider than one pixel
VISIBLE_COS = 0.3  # a point counts from this cosine between its normal and the view ray, fully from 0.6
CHARBONNIER = 0.01  # colour units (0..1): below this the distance is quadratic, above it nearly linear
PATCH_EPS = 0.01  # colour units: a patch whose colours vary less than this has no correlation to offer


def skin_vertices(vertices: np.ndarray, region: np.ndarray, names: list[str], count: int,
                  seed: int = 0) -> np.ndarray:
    """`count` template vertex ids on the face's outer skin, spread evenly (farthest-point sampling)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    hidden = [names.index(n) for n in HIDDEN_REGIONS]
    ok = ((vertices >= FACE_MIN) & (vertices <= FACE_MAX)).all(1) & ~np.isin(region, hidden)
    ids = np.flatnonzero(ok)
    if len(ids) < count:
        raise ValueError(f"only {len(ids)} face vertices for {count} photometric points")
    pts = vertices[ids].astype(np.float64)
    pick = [int(np.random.default_rng(seed).integers(len(ids)))]
    dist = np.linalg.norm(pts - pts[pick[0]], axis=1)
    for _ in range(count - 1):
        pick.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[pick[-1]], axis=1))
    return ids[np.array(pick)]


def prepare(frames: np.ndarray, device: torch.device, sigma: float = BLUR_PX) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) uint8, each frame blurred by a separable Gaussian. Kept in 8 bits (a
    video may hold 400 megapixels: as floats they would take 4.8 GB); frame by frame for the same reason."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32, device=device) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    out = torch.empty(frames.shape[0], 3, *frames.shape[1:3], dtype=torch.uint8, device=device)
    for t, frame in enumerate(frames):
        img = torch.as_tensor(frame, device=device).permute(2, 0, 1)[None].float()
        img = torch.nn.functional.conv2d(torch.nn.functional.pad(img, (r, r, r, r), mode="replicate"), k, groups=3)
        img = torch.nn.functional.conv2d(img, k.transpose(-1, -2), groups=3)
        out[t] = img[0].round().clamp(0, 255).to(torch.uint8)
    return out


def sample(images: Tensor, pixels: Tensor) -> Tensor:
    """Bilinear colours (T, N, 3) in [0, 1] at pixel positions (T, N, 2) (x right, y down, pixel edges at
    integers; outside the frame the border pixels), differentiable in the positions; images (T, 3, H, W)."""
    T, C, H, W = images.shape
    x = (pixels[..., 0] - 0.5).clamp(0, W - 1)
    y = (pixels[..., 1] - 0.5).clamp(0, H - 1)
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    flat = images.view(T, C, H * W)

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        return flat.gather(2, (yi * W + xi)[:, None].expand(T, C, -1)).to(pixels.dtype) / 255.0

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy).transpose(1, 2)


def visibility(normals: Tensor, points: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """Weights (T, N) in [0, 1]: how squarely each point faces the camera. normals (1 or T, N, 3) in the model
    frame (the neutral surface's; an expression tilts them little), points (T, N, 3). No gradient."""
    with torch.no_grad():
        n = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        n_cam = n @ rotation.transpose(-1, -2)
        cam = points @ rotation.transpose(-1, -2) + translation[:, None]
        cos = -(n_cam * cam).sum(-1) / cam.norm(dim=-1).clamp_min(1e-9)
        return ((cos - VISIBLE_COS) / VISIBLE_COS).clamp(0.0, 1.0)


def consistency_loss(colours: Tensor, weights: Tensor) -> Tensor:
    """Mean Charbonnier distance between each point's colours in consecutive frames, weighted by both frames'
    weights (T, N). Zero for fewer than two frames or no point seen twice."""
    if colours.shape[0] < 2:
        return colours.new_zeros(())
    w = weights[1:] * weights[:-1]
    d2 = (colours[1:] - colours[:-1]).square().sum(-1)
    rho = (d2 + CHARBONNIER ** 2).sqrt() - CHARBONNIER
    return (w * rho).sum() / w.sum().clamp_min(1e-6)


def patch_offsets(normals: Tensor, size: int, spacing: float) -> Tensor:
    """(..., P, size*size, 3) offsets (m) of a square grid of `size` x `size` points `spacing` apart in the
    tangent plane of each normal (..., P, 3): the skin patch about a point, carried rigidly with it."""
    n = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    helper = torch.zeros_like(n)
    helper[..., 1] = 1.0  # any direction not along the face's normals (which point mostly along +z)
    t1 = torch.linalg.cross(helper, n)
    t1 = t1 / t1.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    t2 = torch.linalg.cross(n, t1)
    g = (torch.arange(size, dtype=n.dtype, device=n.device) - (size - 1) / 2) * spacing
    a, b = torch.meshgrid(g, g, indexing="ij")
    return a.reshape(-1, 1) * t1[..., None, :] + b.reshape(-1, 1) * t2[..., None, :]


def patch_ncc_loss(colours: Tensor, weights: Tensor, lags: int, eps: float = PATCH_EPS) -> Tensor:
    """Mean of 1 - ZNCC between the patch colours (T, P, S, 3) one skin point shows in frames t and t + lag,
    lag = 1 .. `lags`, weighted by both frames' weights (T, P). The normalised correlation ignores a gain and
    an offset of the patch's colours, so a point's shading may change with the head's turn and wider baselines
    (a stereo pair seeing depth) can be compared; eps (colour units) keeps a flat patch from correlating noise.
    Zero for fewer than two frames or no point seen twice."""
    T = colours.shape[0]
    if T < 2:
        return colours.new_zeros(())
    v = colours.flatten(2)  # (T, P, S*3)
    v = v - v.mean(-1, keepdim=True)
    norm = (v.square().sum(-1) + v.shape[-1] * eps ** 2).sqrt()  # (T, P)
    total, wsum = colours.new_zeros(()), colours.new_zeros(())
    for lag in range(1, min(lags, T - 1) + 1):
        ncc = (v[lag:] * v[:-lag]).sum(-1) / (norm[lag:] * norm[:-lag])
        w = weights[lag:] * weights[:-lag]
        total = total + (w * (1 - ncc)).sum()
        wsum = wsum + w.sum()
    return total / wsum.clamp_min(1e-6)
