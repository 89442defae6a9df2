"""Positional encoding gamma(x) = [x, sin(2^l pi x), cos(2^l pi x)] for l < n_freqs."""

import math

import torch


def encoded_dim(n_freqs: int) -> int:
    return 3 + 6 * n_freqs


def positional_encoding(x: torch.Tensor, n_freqs: int, scale: float) -> torch.Tensor:
    """x (..., 3) in metres; `scale` maps the coordinates of interest to roughly [-1, 1] first."""
    xs = x * scale
    if n_freqs == 0:
        return xs
    freqs = (2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)) * math.pi
    ang = (xs[..., None, :] * freqs[:, None]).flatten(-2)  # (..., 3 * n_freqs)
    return torch.cat([xs, torch.sin(ang), torch.cos(ang)], dim=-1)
