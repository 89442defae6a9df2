"""An analytic stand-in for the ICT sampler: each "identity" is a sphere with its own centre and radius,
so every field of the sampler's batch has an exact value (SDF, normals, template correspondence, anchors).
Used by the CPU smoke run and the overfit test; its batches have the sampler's format (docs/architecture.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import constants


def _directions(n: int) -> Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return torch.stack([torch.sin(phi) * torch.cos(theta), torch.cos(phi), torch.sin(phi) * torch.sin(theta)],
                       -1).float()


class SphereSource:
    def __init__(self, n_identities: int, device: str = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n = n_identities
        self.device = device
        self.centre = (torch.rand(n_identities, 3, generator=g) - 0.5) * 0.04 + torch.tensor([0.0, -0.01, 0.02])
        self.radius = 0.06 + 0.04 * torch.rand(n_identities, generator=g)
        self.mean_centre = self.centre.mean(0)
        self.mean_radius = float(self.radius.mean())
        self.dirs = _directions(constants.N_REGIONS)
        self.anchor_init = self.mean_centre + self.mean_radius * self.dirs
        self.coeffs = torch.randn(n_identities, 100, generator=g)  # stand-in ICT coefficients (encoder runs)

    def sdf(self, x: Tensor, ids: Tensor) -> Tensor:
        c, r = self.centre.to(x.device)[ids], self.radius.to(x.device)[ids]
        return (x - c[:, None]).norm(dim=-1) - r[:, None]

    def batch(self, b: int, ns: int, nq: int, gen: torch.Generator, fresh_identities: bool = False
              ) -> dict[str, Tensor]:
        if fresh_identities:
            raise ValueError("the sphere source has a fixed set of identities")
        ids = torch.randint(0, self.n, (b,), generator=gen)
        c, r = self.centre[ids][:, None], self.radius[ids][:, None, None]
        n = torch.nn.functional.normalize(torch.randn(b, ns, 3, generator=gen), dim=-1)
        surf = c + r * n
        near = surf + torch.randn(b, ns, 3, generator=gen) * 0.01
        box = torch.rand(b, nq - ns, 3, generator=gen) * 0.36 - 0.18 if nq > ns else surf[:, :0]
        space = torch.cat([near, box], 1)[:, :nq]
        out = {
            "id_index": ids,
            "id_coeffs": self.coeffs[ids],
            "exp_weights": torch.zeros(b, constants.N_EXPRESSIONS),
            "surf_posed": surf,
            "surf_normal": n,
            "surf_canon": surf,
            "surf_canon_normal": n,
            "surf_template": self.mean_centre + self.mean_radius * n,
            "surf_region": (n @ self.dirs.T).argmax(-1),
            "space_posed": space,
            "space_sdf": self.sdf(space, ids),
            "canon_space": space,
            "canon_sdf": self.sdf(space, ids),
            "anchors": c + r * self.dirs,
        }
        return {k: v.to(self.device) for k, v in out.items()}
