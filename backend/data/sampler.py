"""Training batches from the ICT-FaceKit model, generated on the fly on the sampler's device (CPU or CUDA).

    sampler = HeadSampler(".data/ict.safetensors", device="cuda")      # atlas: weights/atlas.safetensors
    batch = sampler.batch(16, n_surface=2048, n_space=2048, generator=torch.Generator().manual_seed(0))

Batch (all on the sampler's device, float32 unless noted; docs/architecture.md "Sampler batch"):
  id_index (B,) long, id_coeffs (B,100), exp_weights (B,53)
  surf_posed, surf_normal, surf_canon, surf_canon_normal, surf_template (B,Ns,3), surf_region (B,Ns) long
  space_posed (B,Nq,3), space_sdf (B,Nq); canon_space (B,Nq,3), canon_sdf (B,Nq); anchors (B,39,3)

Data: identity i of n_train gets the coefficients row i of splits.train_identities (N(0, I), seeded);
each sample takes a uniformly random training identity and, with probability p_neutral, the neutral
expression, else a uniformly random row of splits.train_expressions (65,536 sparse combinations of the 53
shapes): 4,096 identities x 65,537 expressions. With SamplerConfig.p_named > 0, that fraction of the
non-neutral samples is instead one named shape at weight 1 (with p_symmetric its _L/_R partner too): the
extremes artists key (eyeBlink closes the lids only near 1), which the mixtures reach rarely. With
SamplerConfig.motion_weight > 0, every triangle's sampling density is also scaled by how far the expression
moves it (HeadSampler.face_motion).
Held-out identities/expressions (splits.py) are other seed streams.
Vertices = neutral + c @ id_basis + w @ exp_basis, one matmul per batch.

Geometry: the closed surface is head (+ ear-clipped neck cap) + both scleras (backend.data.ict). Surface
points are area-weighted (times SamplerConfig.detail_weight on DETAIL_REGIONS, as are the near-surface
space points) on the triangles that bound the union (exposed_faces: the mean head's
face_buried mask, re-tested per mesh where lids meet the eyeballs); normals are the
face normals; surf_canon / surf_template are the same barycentric point on the identity's neutral head /
on the mean neutral head; surf_region is the atlas region of the triangle corner with the largest
barycentric weight. Space points: fractions `space_fractions` of (surface + N(0, sigma_1^2)),
(surface + N(0, sigma_2^2)) and uniform in the canonical box (constants.BBOX_*). Signed distance = exact
distance to the nearest exposed triangle (ClusteredMesh; exact, see mesh.py) with the sign of the
generalised winding number of the union (> 0.5 inside, negative SDF). On CUDA both come from the fused
Triton kernel of sdf_kernel.py (same answers; `sdf_impl` picks the implementation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ..constants import BBOX_MAX, BBOX_MIN
from . import mesh, sdf_kernel, splits
from .atlas import Atlas, load_atlas
from .ict import closed_groups, load_ict


T = TypeVar("T")
EYE_MARGIN = 0.003    # metres from a sclera within which exposed head triangles are re-tested per mesh
MOTION_UNIT = 0.01    # m: SamplerConfig.motion_weight counts a triangle's expression motion in cm
# thin, small parts whose defects show most (lip slits, nostril notches, lids, ears): SamplerConfig.detail_weight
# multiplies their area for surface and near-surface samples
DETAIL_REGIONS = ("upper lip", "lower lip", "left mouth corner", "right mouth corner", "nose tip", "left nostril",
                  "right nostril", "left upper eyelid", "right upper eyelid", "left lower eyelid",
                  "right lower eyelid", "left ear", "right ear")


@dataclass(frozen=True)
class SamplerConfig:
    n_train: int = 4096
    n_expressions: int = 65536
    seed: int = splits.DEFAULT_SEED
    n_surface: int = 2048
    n_space: int = 2048
    sigmas: tuple[float, float] = (0.002, 0.01)            # metres
    space_fractions: tuple[float, float, float] = (0.45, 0.35, 0.20)
    p_neutral: float = 0.1
    leaf: int = 32                                          # triangles per cluster (mesh.ClusteredMesh)
    k_exact: int = 8                                        # clusters evaluated exactly per point (mesh.py)
    detail_weight: float = 1.0                              # sampling density on DETAIL_REGIONS' triangles
    p_named: float = 0.0                                    # share of one-shape-at-weight-1 expressions
    motion_weight: float = 0.0                              # extra density per cm a triangle moves (posed - canon)


SDF_IMPLS = ("auto", "torch", "triton")


def resolve_sdf_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "triton" on a CUDA device with triton installed, else "torch"; "triton" where it cannot run
    is an error."""
    if impl not in SDF_IMPLS:
        raise ValueError(f"sdf_impl must be one of {SDF_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and sdf_kernel.available(device) else "torch"
    if impl == "triton" and not sdf_kernel.available(device):
        raise ValueError(f"the triton SDF kernel cannot run on {device} (needs triton and CUDA, or TRITON_INTERPRET=1)")
    return impl


class HeadSampler:
    def __init__(self, ict_path: str | Path, atlas: Atlas | str | Path | None = None,
                 device: str | torch.device = "cpu", config: SamplerConfig = SamplerConfig(), sdf_impl: str = "auto"):
        """sdf_impl: how distances and winding numbers are computed: "torch" (mesh.ClusteredMesh.query),
        "triton" (the fused kernel of sdf_kernel.py; a CUDA device, or TRITON_INTERPRET=1 on the CPU), or
        "auto": triton on CUDA where it is installed, else torch."""
        self.cfg = config
        self.device = torch.device(device)
        self.sdf_impl = resolve_sdf_impl(sdf_impl, self.device)
        self._sdf_auto = sdf_impl == "auto"
        ict = load_ict(ict_path)
        self.atlas = atlas if isinstance(atlas, Atlas) else load_atlas(atlas)
        if not (np.array_equal(self.atlas.faces, ict.faces)
                and np.allclose(self.atlas.vertices, ict.neutral, atol=1e-6)):
            raise ValueError("atlas and converted ICT file describe different meshes; rebuild the atlas")
        dev = self.device
        self.expressions = list(ict.expressions)
        self.n_vertices = len(ict.neutral)
        self.faces = torch.as_tensor(ict.faces, dtype=torch.long, device=dev)
        self.neutral = torch.as_tensor(ict.neutral, device=dev)
        # float64 bases: a float32 matmul may run as TF32 on GPUs (10-bit mantissa), too coarse for vertices
        self.id_basis = torch.as_tensor(ict.id_basis.reshape(len(ict.id_basis), -1), dtype=torch.float64, device=dev)
        self.exp_basis = torch.as_tensor(ict.exp_basis.reshape(len(ict.exp_basis), -1), dtype=torch.float64, device=dev)
        self.exposed = torch.as_tensor(ict.face_buried == 0, device=dev)
        self._init_eye_candidates(ict)
        self.region = torch.as_tensor(self.atlas.region, dtype=torch.long, device=dev)
        if config.detail_weight <= 0:
            raise ValueError(f"detail_weight must be positive, got {config.detail_weight}")
        detail = np.isin(self.atlas.face_region(), [self.atlas.names.index(n) for n in DETAIL_REGIONS])
        self.face_weight = torch.as_tensor(np.where(detail, config.detail_weight, 1.0), device=dev)
        if not 0.0 <= config.p_named <= 1.0:
            raise ValueError(f"p_named must be in [0, 1], got {config.p_named}")
        if not config.motion_weight >= 0.0:
            raise ValueError(f"motion_weight must be >= 0, got {config.motion_weight}")
        self.partner = torch.as_tensor(splits.mirror_partners(self.expressions), device=dev)
        self.anchor_vertex = torch.as_tensor(self.atlas.anchor_vertex, dtype=torch.long, device=dev)
        self.train_ids = torch.as_tensor(splits.train_identities(config.n_train, config.seed), device=dev)
        self.train_exps = torch.as_tensor(
            splits.train_expressions(self.expressions, config.n_expressions, config.seed), device=dev)
        self.accel = mesh.ClusteredMesh(ict.neutral, ict.faces, closed_groups(ict.face_part, ict.face_parts),
                                        leaf=config.leaf, device=dev)
        self.bbox_min = torch.tensor(BBOX_MIN, device=dev)
        self.bbox_size = torch.tensor(BBOX_MAX, device=dev) - self.bbox_min

    # ------------------------------------------------------------------------------------------ public
    @property
    def n_train(self) -> int:
        return self.cfg.n_train

    @property
    def anchor_init(self) -> torch.Tensor:
        """(39,3) anchors on the mean head (atlas)."""
        return self.neutral[self.anchor_vertex]

    @property
    def mirror_pairs(self) -> list[tuple[int, int]]:
        return [(i, m) for i, m in enumerate(self.atlas.mirror) if m is not None and i < m]

    def meshes(self, id_coeffs: torch.Tensor, exp_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(posed, canonical) vertices (B,V,3) for coefficients (B,100) and weights (B,53)."""
        id_delta = (id_coeffs.double() @ self.id_basis).view(-1, self.n_vertices, 3)
        posed_delta = id_delta + (exp_weights.double() @ self.exp_basis).view(-1, self.n_vertices, 3)
        return (self.neutral + posed_delta).float(), (self.neutral + id_delta).float()

    def exposed_faces(self, verts: torch.Tensor) -> torch.Tensor:
        """(B,F) bool: triangles on the boundary of the union for these meshes. Start from the mean head's
        mask (face_buried) and re-test, per mesh, the triangles where head and scleras can newly overlap
        (see _init_eye_candidates): one whose centroid lies inside the other component(s) (winding
        number > 0.5) is buried. Lids closing over the eyeball (eyeBlink) are thus handled."""
        cent = verts[:, self.faces[self.eye_faces]].mean(2)                    # (B,E,3)

        def kernel() -> torch.Tensor:     # only the other component's winding number: head for sclera faces
            other = torch.empty(cent.shape[:2], device=verts.device)
            tables = sdf_kernel.prepare(self.accel, verts)
            for pick, groups in ((self.eye_sclera_idx, (0, 1)), (self.eye_head_idx, (1, self.accel.n_groups))):
                w = sdf_kernel.query(self.accel, cent[:, pick], verts, need_distance=False, groups=groups,
                                     tables=tables)["winding"]
                other[:, pick] = w.sum(-1)
            return other

        def torch_path() -> torch.Tensor:
            w = self.accel.query(cent, verts, k=self.cfg.k_exact, chunk=self._chunk(), need_distance=False)["winding"]
            return torch.where(self.eye_is_sclera, w[..., 0], w[..., 1:].sum(-1))

        other = self._with_fallback(kernel, torch_path)
        exposed = self.exposed.expand(len(verts), -1).clone()
        exposed[:, self.eye_faces] = other < 0.5
        return exposed

    def signed_distance(self, points: torch.Tensor, verts: torch.Tensor,
                        exposed: torch.Tensor | None = None) -> torch.Tensor:
        """SDF (B,N) of points (B,N,3) to the closed union surface of meshes verts (B,V,3); negative inside.
        Distances are to `exposed` triangles (default: exposed_faces(verts))."""
        exposed = self.exposed_faces(verts) if exposed is None else exposed
        r = self._query(points, verts, face_mask=exposed)
        inside = r["winding"].sum(-1) > 0.5
        return torch.where(inside, -r["distance"], r["distance"])

    def batch(self, batch_size: int, n_surface: int | None = None, n_space: int | None = None,
              generator: torch.Generator | None = None, fresh_identities: bool = False) -> dict[str, torch.Tensor]:
        """With `fresh_identities`, each sample's identity coefficients are a new draw from N(0, I) (id_index
        is then -1): the whole ICT identity space is training data, for models that encode coefficients."""
        ns = n_surface or self.cfg.n_surface
        nq = n_space or self.cfg.n_space
        if batch_size < 1 or ns < 1 or nq < 1:
            raise ValueError(f"batch size and point counts must be positive, got {batch_size}, {ns}, {nq}")
        gen = self._device_generator(generator)
        dev, b = self.device, batch_size
        id_index = torch.randint(self.cfg.n_train, (b,), device=dev, generator=gen)
        rows = torch.randint(len(self.train_exps), (b,), device=dev, generator=gen)
        neutral = torch.rand(b, device=dev, generator=gen) < self.cfg.p_neutral
        if fresh_identities:
            id_coeffs = torch.randn(b, self.train_ids.shape[1], device=dev, generator=gen)
            id_index = torch.full_like(id_index, -1)
        else:
            id_coeffs = self.train_ids[id_index]
        exp_weights = self.train_exps[rows]
        if self.cfg.p_named > 0:  # drawn only when asked, so runs without it keep their batches
            named = torch.rand(b, device=dev, generator=gen) < self.cfg.p_named
            shape = torch.randint(len(self.expressions), (b,), device=dev, generator=gen)
            both = torch.rand(b, device=dev, generator=gen) < splits.ExpressionRecipe().p_symmetric
            one = torch.zeros_like(exp_weights)
            sample = torch.arange(b, device=dev)
            one[sample, shape] = 1.0
            one[sample[both], self.partner[shape[both]]] = 1.0
            exp_weights = torch.where(named[:, None], one, exp_weights)
        exp_weights = exp_weights * (~neutral)[:, None]
        posed, canon = self.meshes(id_coeffs, exp_weights)

        exposed_posed, exposed_canon = self.exposed_faces(posed), self.exposed_faces(canon)
        weight_posed = exposed_posed.to(posed.dtype) * self.face_weight.to(posed.dtype)
        weight_canon = exposed_canon.to(canon.dtype) * self.face_weight.to(canon.dtype)
        if self.cfg.motion_weight > 0:  # skipped at 0 so that runs without it keep their batches bit for bit
            moved = self.face_motion(posed, canon)
            weight_posed = weight_posed * moved
            weight_canon = weight_canon * moved
        face, bary = mesh.sample_surface(posed, self.faces, ns, gen, weight_posed)
        _, normals_posed = mesh.face_area_normals(posed, self.faces)
        _, normals_canon = mesh.face_area_normals(canon, self.faces)
        bidx = torch.arange(b, device=dev)[:, None]
        corner = self.faces[face, bary.argmax(-1)]
        out = {
            "id_index": id_index, "id_coeffs": id_coeffs, "exp_weights": exp_weights,
            "surf_posed": mesh.interpolate(posed, self.faces, face, bary),
            "surf_normal": normals_posed[bidx, face],
            "surf_canon": mesh.interpolate(canon, self.faces, face, bary),
            "surf_canon_normal": normals_canon[bidx, face],
            "surf_template": mesh.interpolate(self.neutral.expand(b, -1, -1), self.faces, face, bary),
            "surf_region": self.region[corner],
            "anchors": canon[:, self.anchor_vertex],
        }
        out["space_posed"] = self._space_points(posed, weight_posed, nq, gen)
        out["space_sdf"] = self.signed_distance(out["space_posed"], posed, exposed_posed)
        out["canon_space"] = self._space_points(canon, weight_canon, nq, gen)
        out["canon_sdf"] = self.signed_distance(out["canon_space"], canon, exposed_canon)
        return out

    def face_motion(self, posed: torch.Tensor, canon: torch.Tensor) -> torch.Tensor:
        """Sampling factor (B, F) 1 + motion_weight * (the triangle's mean vertex motion in cm): where an
        expression moves the skin far (a closing lid moves ~1 cm over a few mm of skin), the warp has the most
        to learn from the fewest area-weighted samples."""
        motion = (posed - canon).norm(dim=-1)[:, self.faces].mean(-1)
        return 1.0 + self.cfg.motion_weight * motion / MOTION_UNIT

    # ----------------------------------------------------------------------------------------- private
    def _init_eye_candidates(self, ict) -> None:
        """Triangles whose exposure can change: exposed (on the mean head) sclera triangles, which lids can
        cover, and exposed head triangles whose centroid is within EYE_MARGIN of a sclera vertex (lid
        margins, which can move into the eyeball). Buried triangles stay buried: the eyeballs do not move
        under ICT expressions, so what is behind them stays behind them."""
        groups = closed_groups(ict.face_part, ict.face_parts)
        neutral = torch.as_tensor(ict.neutral, dtype=torch.float64)
        cent = neutral[torch.as_tensor(ict.faces, dtype=torch.long)].mean(1)
        sclera_v = neutral[torch.as_tensor(np.unique(ict.faces[groups > 0]))]
        near = torch.cat([torch.cdist(c, sclera_v).amin(1) for c in cent.split(4096)]).numpy() < EYE_MARGIN
        cand = np.flatnonzero((ict.face_buried == 0) & ((groups > 0) | near))
        self.eye_faces = torch.as_tensor(cand, device=self.device)
        self.eye_is_sclera = torch.as_tensor(groups[cand] > 0, device=self.device)
        self.eye_sclera_idx = torch.as_tensor(np.flatnonzero(groups[cand] > 0), device=self.device)
        self.eye_head_idx = torch.as_tensor(np.flatnonzero(groups[cand] == 0), device=self.device)

    def _query(self, points: torch.Tensor, verts: torch.Tensor,
               face_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self._with_fallback(
            lambda: sdf_kernel.query(self.accel, points, verts, face_mask=face_mask),
            lambda: self.accel.query(points, verts, k=self.cfg.k_exact, k_distance=self.cfg.k_exact,
                                     chunk=self._chunk(), face_mask=face_mask))

    def _with_fallback(self, kernel: Callable[[], T], torch_path: Callable[[], T]) -> T:
        """The kernel where sdf_impl is "triton"; if it fails where it was only chosen automatically (say, a
        GPU where it does not compile), warn once and use the torch path from then on."""
        if self.sdf_impl == "triton":
            try:
                return kernel()
            except Exception as e:
                if not self._sdf_auto:
                    raise
                warnings.warn(f"the Triton SDF kernel failed ({e!r}); the sampler uses the torch path", stacklevel=3)
                self.sdf_impl = "torch"
        return torch_path()

    def _chunk(self) -> int:
        return 16384 if self.device.type == "cuda" else 2048

    def _space_points(self, verts: torch.Tensor, weights: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        f1, f2, _ = self.cfg.space_fractions
        n1, n2 = round(n * f1), round(n * f2)
        n3 = n - n1 - n2
        b = len(verts)
        face, bary = mesh.sample_surface(verts, self.faces, n1 + n2, gen, weights)
        p = mesh.interpolate(verts, self.faces, face, bary)
        sigma = torch.cat([torch.full((n1,), self.cfg.sigmas[0]), torch.full((n2,), self.cfg.sigmas[1])]).to(p)
        near = p + torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=gen) * sigma[None, :, None]
        box = self.bbox_min + torch.rand(b, n3, 3, device=p.device, dtype=p.dtype, generator=gen) * self.bbox_size
        return torch.cat([near, box], 1)

    def _device_generator(self, generator: torch.Generator | None) -> torch.Generator:
        """A generator on the sampler's device; a CPU generator given for a CUDA sampler seeds a new one
        deterministically (callers pass CPU generators seeded per step)."""
        if generator is None:
            return torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,))))
        if generator.device.type == self.device.type:
            return generator
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return torch.Generator(self.device).manual_seed(seed)
