"""Positional encoding gamma(x) = [x, sin(2^l pi x), cos(2^l pi x)] for l < n_freqs."""

import math

import torch


def encoded_dim(n_freqs: int) -> int:
    return 3 + 6 * n_freqs


def encoding_freqs(n_freqs: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The frequencies 2^l pi, l < n_freqs."""
    return (2.0 ** torch.arange(n_freqs, device=device, dtype=dtype)) * math.pi


def positional_encoding(x: torch.Tensor, n_freqs: int, scale: float, freqs: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """x (..., 3) in metres; `scale` maps the coordinates of interest to roughly [-1, 1] first. `freqs`:
    encoding_freqs made once by a caller that encodes many small batches (three kernel launches fewer each)."""
    xs = x * scale
    if n_freqs == 0:
        return xs
    if freqs is None:
        freqs = encoding_freqs(n_freqs, x.device, x.dtype)
    ang = (xs[..., None, :] * freqs[:, None]).flatten(-2)  # (..., 3 * n_freqs)
    return torch.cat([xs, torch.sin(ang), torch.cos(ang)], dim=-1)
