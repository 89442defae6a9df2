"""Pinhole camera and head pose. Camera frame as OpenGL's and Blender's cameras: looking down -Z, +Y up, +X
right. A model point x maps to the camera frame as R x + t; pixels are x right, y down from the top-left
corner, the principal point at the image centre."""

from __future__ import annotations

import torch
from torch import Tensor


def rotvec_to_matrix(v: Tensor) -> Tensor:
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues; smooth through 0)."""
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]
    theta = theta2.clamp_min(1e-24).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-24))
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def project(points: Tensor, rotation: Tensor, translation: Tensor, focal: Tensor, width: int, height: int
            ) -> Tensor:
    """Model points (T, N, 3) through per-frame poses (T,3,3), (T,3) -> pixels (T, N, 2)."""
    cam = points @ rotation.transpose(-1, -2) + translation[:, None]
    depth = (-cam[..., 2]).clamp_min(1e-3)
    u = width / 2 + focal * cam[..., 0] / depth
    v = height / 2 - focal * cam[..., 1] / depth
    return torch.stack([u, v], -1)


def pixel_rays(pixels: Tensor, rotation: Tensor, translation: Tensor, focal: Tensor, width: int, height: int
               ) -> tuple[Tensor, Tensor]:
    """Rays through pixels (T, N, 2) in the model frame: origins (T, 1, 3) and unit directions (T, N, 3)."""
    d = torch.stack([(pixels[..., 0] - width / 2) / focal, -(pixels[..., 1] - height / 2) / focal,
                     -torch.ones_like(pixels[..., 0])], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    rt = rotation.transpose(-1, -2)
    origin = -(rt @ translation[..., None])[..., 0]
    return origin[:, None], d @ rotation  # d R = (R^T d^T)^T
