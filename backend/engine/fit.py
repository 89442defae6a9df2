"""Fitting an arbitrary mesh or point cloud: input sampling, alignment (align.py), latent fit
(backend.model.inversion.fit_latents), and the fit error.

Not a head: an input whose best alignment leaves the template's face farther than NOT_A_HEAD_COVERAGE_M from it
(median), or whose fitted head stays farther than NOT_A_HEAD_ERROR_MM from it, is refused with the code
`not_a_head` (docs/benchmarks.md has the values measured on heads, Suzanne, a cube and a headless body).

Fit error: trimmed one-sided Chamfer distance from the aligned input samples inside the model's canonical box
(the part of the input a head model describes: a full figure's body is left out) to the fitted head mesh (the
mean of the closest `ERROR_KEEP` fraction of point-to-triangle distances, so shoulders or hair that the
model cannot represent do not dominate), reported in millimetres in the model frame and in input units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .. import errors
from ..data.atlas import Atlas
from .template import MeshIndex

ERROR_KEEP = 0.9
NOT_A_HEAD_COVERAGE_M = 0.004
NOT_A_HEAD_ERROR_MM = 5.0
OUTER_EXCLUDED = ("mouth interior", "left eyeball", "right eyeball")  # not on a scan's outer surface
# Often hidden or reshaped in scans (hair, caps, collars, cut-off necks): not used as template -> input pairs.
UNRELIABLE = ("crown", "occiput", "nape", "throat", "left parietal scalp", "right parietal scalp",
              "left side neck", "right side neck", "left ear", "right ear")


def check_head_coverage(coverage_m: float) -> None:
    """Refuse an alignment that found no face (checked before the latent fit, so a wrong input fails fast)."""
    if not coverage_m <= NOT_A_HEAD_COVERAGE_M:
        raise errors.BackendError(
            f"this does not look like a head: the best alignment leaves the model's face {1000 * coverage_m:.1f} mm "
            f"from the input (median; heads give about 1-2 mm, the limit is {1000 * NOT_A_HEAD_COVERAGE_M:.0f} mm). "
            "Select a head, a bust or a figure with a head, or add 'imhead:<region>' landmark groups",
            code="not_a_head")


def check_fit_error(trimmed_mm: float) -> None:
    if not trimmed_mm <= NOT_A_HEAD_ERROR_MM:
        raise errors.BackendError(
            f"this does not look like a head: the fitted head stays {trimmed_mm:.1f} mm from the input (trimmed "
            f"mean; the limit is {NOT_A_HEAD_ERROR_MM:.0f} mm)", code="not_a_head")


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted surface samples (n,3) and their face normals (n,3)."""
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    if not np.isfinite(area).all() or area.sum() <= 0:
        raise errors.InvalidInput("the mesh is degenerate: its faces have no area")
    face = rng.choice(len(faces), n, p=area / area.sum())
    u = rng.random((n, 2))
    su = np.sqrt(u[:, 0])
    bary = np.stack([1 - su, su * (1 - u[:, 1]), su * u[:, 1]], 1)
    pts = (bary[:, :, None] * tri[face]).sum(1)
    nrm = cross[face] / np.maximum(area[face], 1e-300)[:, None]
    return pts, nrm


def template_surface(atlas: Atlas, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples (n,3) and normals of the mean head's outer surface (mouth interior and eyeballs left out),
    and whether each sample lies in a region that scans usually show unchanged (see UNRELIABLE)."""
    excluded = [atlas.names.index(r) for r in OUTER_EXCLUDED]
    keep = ~np.isin(atlas.face_region(), excluded)
    faces = atlas.faces[keep].astype(np.int64)
    pts, nrm = sample_mesh(atlas.vertices.astype(np.float64), faces, n, np.random.default_rng(seed))
    _, idx = cKDTree(atlas.vertices).query(pts)
    reliable = ~np.isin(atlas.region[idx], [atlas.names.index(r) for r in UNRELIABLE])
    return pts, nrm, reliable


def input_samples(vertices: np.ndarray, faces: np.ndarray | None, normals: np.ndarray | None, n: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Points to fit: area-weighted samples when faces are given (independent of the tessellation), else
    a random subset of the point cloud (with its normals when given)."""
    if faces is not None and len(faces):
        return sample_mesh(vertices, faces, n, rng)
    idx = rng.choice(len(vertices), min(n, len(vertices)), replace=False)
    return vertices[idx], None if normals is None else normals[idx]


@dataclass
class FitError:
    trimmed_mm: float  # mean of the closest ERROR_KEEP fraction of distances, model frame
    median_mm: float
    p90_mm: float
    trimmed_input_units: float  # the same trimmed mean in the input's own units

    def to_dict(self) -> dict:
        return {"trimmed_one_sided_cd_mm": self.trimmed_mm, "median_mm": self.median_mm, "p90_mm": self.p90_mm,
                "trimmed_one_sided_cd_input_units": self.trimmed_input_units, "trim_keep": ERROR_KEEP}


def fit_error(points_model: np.ndarray, vertices: np.ndarray, faces: np.ndarray, scale: float) -> FitError:
    """One-sided distances from aligned input points (model frame) to the fitted mesh."""
    _, _, d = MeshIndex(vertices, faces).closest(points_model)
    d = np.sort(d)
    kept = d[: max(1, int(ERROR_KEEP * len(d)))]
    return FitError(float(kept.mean() * 1e3), float(np.median(d) * 1e3), float(np.percentile(d, 90) * 1e3),
                    float(kept.mean() / scale))
