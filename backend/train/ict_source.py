"""The ICT training source: the data issue's HeadSampler, seen through the train loop's source interface."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.sampler import HeadSampler, SamplerConfig


class IctSource:
    def __init__(self, ict_path: Path, atlas_path: Path | None, device: torch.device, n_train: int = 4096,
                 detail_weight: float = 1.0, p_named: float = 0.0, motion_weight: float = 0.0):
        self.sampler = HeadSampler(ict_path, atlas_path, device=device,
                                   config=SamplerConfig(n_train=n_train, detail_weight=detail_weight, p_named=p_named,
                                                        motion_weight=motion_weight))
        self.n_train = self.sampler.n_train
        self.anchor_init = self.sampler.anchor_init.float().cpu()
        self.mirror_pairs = [[int(a), int(b)] for a, b in self.sampler.mirror_pairs]

    def batch(self, b: int, ns: int, nq: int, gen: torch.Generator, fresh_identities: bool = False
              ) -> dict[str, torch.Tensor]:
        return self.sampler.batch(b, ns, nq, gen, fresh_identities=fresh_identities)
