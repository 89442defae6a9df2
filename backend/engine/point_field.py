"""One head's SDF and blended local features at arbitrary canonical points, outside extraction (vertex
attributes, deform residuals, posed normals): each point through its heaviest local networks until at most
`tol` blend mass is left out (None: all 39), and the SDF's gradient by the reverse pass of sdf_reverse.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sdf_eval import dense_local_features, fold_first_layer, heaviest_regions, local_features
from .sdf_reverse import ReverseWeights, Tape, reverse

if TYPE_CHECKING:
    from ..model.imhead import ImHead


class PointField:
    """The field of the head with region codes zr (1,39,32) and anchors k (1,39,3). Every evaluation returns,
    beside its values, the largest blend mass it left out at any point (0.0 when it kept every region).
    dense_batched: with tol None, the gradient's forward and reverse passes run as batched products over the
    region axis (sdf_eval.dense_local_features) instead of a loop over regions."""

    def __init__(self, model: ImHead, slots: list[int], reverse_weights: ReverseWeights, zr: torch.Tensor,
                 k: torch.Tensor, tol: float | None, dense_batched: bool):
        self.model, self.slots, self.reverse_weights = model, slots, reverse_weights
        self.zr, self.k, self.tol, self.dense_batched = zr, k, tol, dense_batched

    def features(self, x: torch.Tensor, tape: Tape | None = None) -> tuple[torch.Tensor, float]:
        """Blended features (P,F) at points x (P,3) (sdf_eval.local_features) and the largest blend mass left
        out. With a tape, what the reverse pass needs is recorded on it."""
        m, cfg = self.model, self.model.cfg
        anchors = self.k[0]
        diff = x[:, None] - anchors  # direct differences, as sdf_eval._logits
        dist = diff.norm(dim=-1)
        logits = dist.div(-cfg.sigma)
        keep = None
        dropped = 0.0
        if self.tol is not None:
            keep, left_out = heaviest_regions(logits, self.tol)
            if len(x):
                dropped = float(left_out.max())
            logits = logits.masked_fill(~keep, float("-inf"))
        w = torch.softmax(logits, 1)
        if tape is not None:
            tape.diff, tape.dist, tape.w = diff, dist, w
        with torch.no_grad():
            bias1 = torch.einsum("rz,rzh->rh", self.zr[0], m.loc_wz[m.slot]) + m.loc_b[m.slot]
        if keep is None and tape is not None and self.dense_batched:
            return dense_local_features(m, x, anchors, bias1, w, tape.dense), dropped
        with torch.no_grad():
            first = fold_first_layer(m, anchors, bias1)
        if tape is not None:
            tape.first = first
        return local_features(m, self.slots, x, first, w, keep, None if tape is None else tape.local)[0], dropped

    def field(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """SDF (P,), blended features (P,F) and the largest blend mass left out, differentiable in x."""
        feat, dropped = self.features(x)
        return self.model.sdf_from_features(x, feat), feat, dropped

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(x)[0]

    def field_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """SDF (P,), its gradient in x (P,3), the features (P,F) and the largest blend mass left out, without
        autograd through the local networks: their reverse pass is sdf_reverse.reverse."""
        tape = Tape()
        with torch.no_grad():
            feat, dropped = self.features(x, tape)
        # The small fusion network through autograd, from a scalar: a tensor of output gradients would make
        # autograd import torch.fx's symbolic shapes and sympy (a slower cold start).
        with torch.enable_grad():
            f = feat.requires_grad_(True)
            sdf = self.model.sdf_from_features(x, f)  # x needs no grad: only the fusion head is differentiated
            (dfeat,) = torch.autograd.grad(sdf.sum(), f)
        with torch.no_grad():
            return sdf.detach(), reverse(self.model, self.reverse_weights, x, dfeat, tape), feat.detach(), dropped
