"""Training losses (imHead's list plus ICT deformation and correspondence supervision).

One forward pass evaluates every SDF query of a batch together: canonical surface + canonical space points,
and posed surface + posed space points pulled back through the warp. Gradients with respect to the query
points (create_graph) feed the normal and eikonal terms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import ImHead
from .locality import POINTS as LOCALITY_POINTS, SwapLocality


MOTION_UNIT = 0.01  # m: LossWeights.deform_motion counts ICT motion in cm


@dataclass
class LossWeights:
    # Balanced like SIREN's SDF fit (3e3 / 1e2 / 5e1 in unit-box coordinates, ours are metres): weak normal
    # and eikonal terms let the net fit surface points with a non-distance field (seen: |grad| ~ 0.2).
    surface: float = 3000.0  # |sdf| on surface points (m)
    normal: float = 30.0  # 1 - cos(grad, normal), posed (gradient through the warp)
    normal_canon: float = 30.0  # same on the canonical head
    eikonal: float = 10.0
    space: float = 3000.0  # |sdf - gt| off the surface (m); the targets are exact distances
    anchor: float = 100.0  # |k - k_gt|^2 (m^2), mean over regions, times 1e2 below
    symmetry: float = 1e-3  # |z_a - z_b|^2 for mirrored region pairs
    latent: float = 1e-4  # |z_id|^2 / D
    deform: float = 3000.0  # |x + dx - x_canon| (m)
    # the same error times the point's ICT motion |x - x_canon| in cm: the few points that move far (a lid at
    # eyeBlink 1 moves ~1 cm) are a tiny share of the plain mean, so their large errors barely pull on it
    deform_motion: float = 0.0
    corresp: float = 1000.0  # |template(x_canon) - x_template| (m)
    # |SDF change| (m) on the surface outside a region's 1 cm margin when its code is swapped for another
    # head's (train/locality.py; the eval's locality); 0: off, not computed
    locality: float = 0.0
    space_clamp: float = 0.05  # off-surface SDF targets are clamped to +-this (m), like DeepSDF

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class TrainModule(nn.Module):
    """The network plus the identity codes; forward returns (total loss, per-term losses), so
    DistributedDataParallel sees one module whose forward makes every gradient.

    Identity codes come either from an auto-decoder table (`n_train` codes, one per training identity, the
    imHead recipe) or, with `id_coeff_dim`, from a linear encoder of the sample's ICT identity coefficients:
    then every identity of the ICT model is a training identity (the sampler draws fresh ones), no code lags
    behind the network, and the code distribution is the encoder's image of N(0, I)."""

    def __init__(self, model: ImHead, n_train: int, code_std: float = 0.01, id_coeff_dim: int | None = None):
        super().__init__()
        self.model = model
        self.locality: SwapLocality | None = None  # needed when LossWeights.locality > 0
        if id_coeff_dim is None:
            self.codes = nn.Embedding(n_train, model.cfg.id_dim)
            nn.init.normal_(self.codes.weight, std=code_std)
        else:
            self.id_encoder = nn.Linear(id_coeff_dim, model.cfg.id_dim)
            nn.init.normal_(self.id_encoder.weight, std=code_std)
            nn.init.zeros_(self.id_encoder.bias)

    @property
    def encodes_identities(self) -> bool:
        return hasattr(self, "id_encoder")

    def identity_codes(self, batch: dict[str, Tensor]) -> Tensor:
        if self.encodes_identities:
            return self.id_encoder(batch["id_coeffs"].to(self.id_encoder.weight.dtype))
        return self.codes(batch["id_index"])

    def forward(self, batch: dict[str, Tensor], w: LossWeights, topk: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.model
        z_id = self.identity_codes(batch)
        zr, k = m.decode(z_id)
        z_exp = batch["exp_weights"]

        xc = torch.cat([batch["surf_canon"], batch["canon_space"]], 1).requires_grad_(True)
        xp = torch.cat([batch["surf_posed"], batch["space_posed"]], 1).requires_grad_(True)
        dx = m.warp(xp, z_exp, z_id)
        q = torch.cat([xc, xp + dx], 1)
        s, feat = m.sdf_and_features(q, zr, k, topk)
        gc, gp = torch.autograd.grad(s.sum(), [xc, xp], create_graph=True)
        return loss_terms(self, batch, w, z_id, zr, k, s, gc, gp, dx, feat, xc)


def loss_terms(module: TrainModule, batch: dict[str, Tensor], w: LossWeights, z_id: Tensor, zr: Tensor, k: Tensor,
               s: Tensor, gc: Tensor, gp: Tensor, dx: Tensor, feat: Tensor, xc: Tensor
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total and each term from one forward's outputs: SDF s (B, Nc + Np) at the canonical then
    pulled-back posed queries, their spatial gradients gc (B, Nc, 3) and gp (B, Np, 3; w.r.t. the posed
    points), the warp dx of the posed queries and the blended features (template head)."""
    m = module.model
    s, gc, gp = s.float(), gc.float(), gp.float()
    ns, nq = batch["surf_canon"].shape[1], batch["canon_space"].shape[1]
    nc = ns + nq
    s_sc, s_qc = s[:, :ns], s[:, ns:nc]
    s_sp, s_qp = s[:, nc : nc + ns], s[:, nc + ns :]
    c = w.space_clamp
    warp_err = (batch["surf_posed"] + dx[:, :ns].float() - batch["surf_canon"]).norm(dim=-1)
    out = {
        "surface": 0.5 * (s_sc.abs().mean() + s_sp.abs().mean()),
        "normal": (1 - F.cosine_similarity(gp[:, :ns], batch["surf_normal"], dim=-1)).mean(),
        "normal_canon": (1 - F.cosine_similarity(gc[:, :ns], batch["surf_canon_normal"], dim=-1)).mean(),
        "eikonal": 0.5 * (((gc[:, ns:].norm(dim=-1) - 1) ** 2).mean() + ((gp[:, ns:].norm(dim=-1) - 1) ** 2).mean()),
        "space": 0.5 * (
            (s_qc.clamp(-c, c) - batch["canon_sdf"].clamp(-c, c)).abs().mean()
            + (s_qp.clamp(-c, c) - batch["space_sdf"].clamp(-c, c)).abs().mean()
        ),
        "deform": warp_err.mean(),
        "deform_motion": (warp_err * (batch["surf_posed"] - batch["surf_canon"]).norm(dim=-1) / MOTION_UNIT).mean(),
        "anchor": 1e2 * ((k.float() - batch["anchors"]) ** 2).sum(-1).mean(),
        "latent": (z_id.float() ** 2).sum(-1).mean() / m.cfg.id_dim,
    }
    tmpl = m.template_from_features(xc[:, :ns].detach(), feat[:, :ns])
    out["corresp"] = (tmpl.float() - batch["surf_template"]).norm(dim=-1).mean()
    if w.locality > 0:
        if module.locality is None or "swap_region" not in batch:
            raise ValueError("the locality term needs TrainModule.locality and batch['swap_region']")
        n = min(LOCALITY_POINTS, ns)
        out["locality"] = module.locality(m, zr, k, feat[:, :n], xc[:, :n].detach(), batch["surf_template"][:, :n],
                                          batch["swap_region"])
    if m.cfg.mirror_pairs:
        pairs = torch.tensor(m.cfg.mirror_pairs, device=zr.device)
        out["symmetry"] = ((zr[:, pairs[:, 0]] - zr[:, pairs[:, 1]]).float() ** 2).sum(-1).mean()
    else:
        out["symmetry"] = torch.zeros((), device=zr.device)
    total = sum(getattr(w, name) * val for name, val in out.items())
    return total, {name: val.detach() for name, val in out.items()}
