"""Mesh extraction from any batched SDF callable on the canonical box.

Fast path (`extract_mesh`): coarse-to-fine sparse evaluation. Start from a coarse lattice of cells of side
a = S*h (h = voxel, S a power of two); a cell is subdivided only if

    min over its 8 corners |sdf(c)| <= L * a * sqrt(3) / 2,

where L bounds the SDF's Lipschitz constant (|grad sdf| <= L; 1 for an exact SDF, 1 + eikonal slack for a
learned one). L is also checked on the data: the largest |difference| / length along every evaluated cell
edge is a lower bound on the true constant; if it exceeds L, the extraction is redone with 1.25 x that. Why this is safe: every point p of the cell lies within a*sqrt(3)/2 of some corner c, so
|sdf(p) - sdf(c)| <= L*a*sqrt(3)/2 < |sdf(c)|: no zero inside, and a sign change between two corners would
force a zero on the edge joining them. So a rejected cell has one sign throughout. Every fine cell whose
corners change sign therefore has all ancestors subdivided and all 8 corners evaluated exactly, and marching
cubes sees exactly the values a dense evaluation would give there: the surface is the dense one.

Marching cubes runs on the sign-changing fine cells only (`mc.marching_cubes_cells`, torch, CPU or GPU).
`extract_dense` is the reference: every lattice point evaluated in float32, scikit-image marching cubes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import constants, errors
from .mc import CORNERS, EDGES, marching_cubes_cells

SdfFn = Callable[[torch.Tensor], torch.Tensor]  # (N,3) points in metres -> (N,) signed distance, negative inside

_EXTENT = np.subtract(constants.BBOX_MAX, constants.BBOX_MIN)


def check_resolution(resolution: object) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise errors.InvalidInput(f"resolution must be an integer, got {resolution!r}")
    if not 16 <= int(resolution) <= constants.MAX_RESOLUTION:
        raise errors.InvalidInput(
            f"resolution must be between 16 and {constants.MAX_RESOLUTION}, got {int(resolution)}"
        )
    return int(resolution)


@dataclass(frozen=True)
class Grid:
    """Lattice of points origin + index * voxel, `cells` cells (cells + 1 points) along each axis."""

    voxel: float
    cells: tuple[int, int, int]
    origin: tuple[float, float, float] = tuple(constants.BBOX_MIN)

    @property
    def points_shape(self) -> tuple[int, int, int]:
        return tuple(c + 1 for c in self.cells)

    def to_world(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        origin = torch.tensor(self.origin, dtype=torch.float64, device=index.device)
        return (origin + index.to(torch.float64) * self.voxel).to(dtype)


def make_grid(resolution: int, multiple: int = 1) -> Grid:
    """R cells along the longest box side; cell counts rounded up to a multiple of `multiple` (the padding
    only extends the box beyond BBOX_MAX, where the head is not)."""
    voxel = float(_EXTENT.max()) / resolution
    cells = [int(math.ceil(e / voxel - 1e-9)) for e in _EXTENT]
    cells = [multiple * int(math.ceil(c / multiple)) for c in cells]
    return Grid(voxel=voxel, cells=tuple(cells))


@dataclass
class Mesh:
    vertices: np.ndarray  # (V,3) float32, metres
    faces: np.ndarray  # (F,3) int32, outward winding


@dataclass
class ExtractStats:
    resolution: int
    voxel: float
    dense_points: int  # lattice points a dense evaluation of the unpadded box needs
    lipschitz: float = 1.0  # L used for the band
    lipschitz_observed: float = 0.0  # largest finite-difference slope seen on evaluated cell edges
    points_evaluated: int = 0
    cells_marched: int = 0
    components_removed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _evaluate(sdf_fn: SdfFn, points: torch.Tensor, chunk: int) -> torch.Tensor:
    out = [sdf_fn(points[i : i + chunk]).reshape(-1).float() for i in range(0, points.shape[0], chunk)]
    if not out:
        return points.new_zeros((0,), dtype=torch.float32)
    values = torch.cat(out)
    if not torch.isfinite(values).all():
        raise errors.BackendError("the SDF returned NaN or Inf values", code="internal_error")
    return values


def _keys(index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    return (index[..., 0] * shape[1] + index[..., 1]) * shape[2] + index[..., 2]


def _unkey(key: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    z = key % shape[2]
    y = (key // shape[2]) % shape[1]
    x = key // (shape[1] * shape[2])
    return torch.stack([x, y, z], dim=-1)


def _coarse_stride(resolution: int, coarse_cells: int) -> int:
    stride = 1
    while resolution // (stride * 2) >= coarse_cells:
        stride *= 2
    return stride


def extract_mesh(
    sdf_fn: SdfFn,
    resolution: int,
    *,
    device: torch.device | str = "cpu",
    lipschitz: float = 1.0,
    coarse_cells: int = 16,
    chunk: int = 1 << 18,
    min_component: float = 0.01,
    samples: list | None = None,
) -> tuple[Mesh, ExtractStats]:
    """Sparse coarse-to-fine extraction (see module docstring). `lipschitz` is L above; pieces with fewer
    than `min_component` x the largest piece's faces are dropped. If `samples` is a list, (fine lattice
    index (N,3), value (N,)) pairs of every evaluated point are appended to it (tests use this)."""
    resolution = check_resolution(resolution)
    device = torch.device(device)
    t0 = time.perf_counter()
    result = _extract_once(sdf_fn, resolution, device, lipschitz, coarse_cells, chunk, samples)
    if result[2].lipschitz_observed > lipschitz * (1 + 1e-3):  # tolerance: float32 rounding of the values
        if samples is not None:
            samples.clear()
        result = _extract_once(sdf_fn, resolution, device, 1.25 * result[2].lipschitz_observed, coarse_cells,
                               chunk, samples)
    cells, corner_values, stats, grid = result
    with torch.no_grad():
        t1 = time.perf_counter()
        verts, faces = marching_cubes_cells(cells, corner_values, grid.points_shape)
        verts = grid.to_world(verts, torch.float64)
        mesh = Mesh(verts.cpu().numpy().astype(np.float32), faces.cpu().numpy().astype(np.int32))
    t2 = time.perf_counter()
    mesh, stats.components_removed = remove_small_components(mesh, min_component)
    stats.seconds = {"evaluate": t1 - t0, "marching_cubes": t2 - t1, "cleanup": time.perf_counter() - t2}
    return mesh, stats


def _extract_once(
    sdf_fn: SdfFn,
    resolution: int,
    device: torch.device,
    lipschitz: float,
    coarse_cells: int,
    chunk: int,
    samples: list | None,
) -> tuple[torch.Tensor, torch.Tensor, ExtractStats, Grid]:
    """The coarse-to-fine descent: returns the sign-changing fine cells and their corner values."""
    stride = _coarse_stride(resolution, coarse_cells)
    grid = make_grid(resolution, multiple=stride)
    dense = make_grid(resolution)
    stats = ExtractStats(resolution, grid.voxel, int(np.prod(dense.points_shape)), lipschitz=lipschitz)
    corners = torch.as_tensor(CORNERS, device=device)
    edges = torch.as_tensor(EDGES, device=device)

    with torch.no_grad():
        # Top level: every point of the coarse lattice.
        shape = tuple(c // stride + 1 for c in grid.cells)
        cells = _unkey(torch.arange(math.prod(c - 1 for c in shape), device=device), tuple(c - 1 for c in shape))
        point_keys = torch.arange(math.prod(shape), device=device)
        while True:
            pts = _unkey(point_keys, shape)
            values = _evaluate(sdf_fn, grid.to_world(pts * stride), chunk)
            stats.points_evaluated += int(values.shape[0])
            if samples is not None:
                samples.append((pts * stride, values))
            if point_keys.shape[0] == math.prod(shape):  # dense lattice: keys are positions
                corner_values = values[_keys(cells[:, None, :] + corners, shape)]
            else:
                corner_values = values[inverse].view(-1, 8)
            if corner_values.shape[0]:
                slope = (corner_values[:, edges[:, 0]] - corner_values[:, edges[:, 1]]).abs().max()
                stats.lipschitz_observed = max(stats.lipschitz_observed, float(slope) / (stride * grid.voxel))
            if stride == 1:
                break
            half_diagonal = stride * grid.voxel * math.sqrt(3.0) / 2.0
            cells = cells[corner_values.abs().amin(dim=1) <= lipschitz * half_diagonal]
            stride //= 2
            shape = tuple(c // stride + 1 for c in grid.cells)
            cells = (cells[:, None, :] * 2 + corners).reshape(-1, 3)
            point_keys, inverse = torch.unique(_keys(cells[:, None, :] + corners, shape), return_inverse=True)
        crossing = (corner_values.amin(dim=1) < 0) & (corner_values.amax(dim=1) >= 0)
        stats.cells_marched = int(crossing.sum())
    return cells[crossing], corner_values[crossing], stats, grid


def extract_dense(
    sdf_fn: SdfFn,
    resolution: int,
    *,
    device: torch.device | str = "cpu",
    chunk: int = 1 << 18,
    method: str = "lorensen",
    min_component: float = 0.0,
) -> tuple[Mesh, np.ndarray]:
    """Reference: every lattice point through `sdf_fn` in float32, scikit-image marching cubes on the full
    volume. Returns the mesh and the (nx+1, ny+1, nz+1) volume."""
    from skimage.measure import marching_cubes

    resolution = check_resolution(resolution)
    grid = make_grid(resolution)
    shape = grid.points_shape
    with torch.no_grad():
        idx = _unkey(torch.arange(math.prod(shape), device=torch.device(device)), shape)
        volume = _evaluate(sdf_fn, grid.to_world(idx), chunk).view(shape).cpu().numpy()
    if not (volume.min() < 0 < volume.max()):
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)), volume
    verts, faces, _, _ = marching_cubes(volume, 0.0, method=method)  # "descent" default = outward here
    verts = np.asarray(grid.origin) + verts.astype(np.float64) * grid.voxel
    mesh = Mesh(verts.astype(np.float32), faces.astype(np.int32))
    return remove_small_components(mesh, min_component)[0], volume


def remove_small_components(mesh: Mesh, min_fraction: float) -> tuple[Mesh, int]:
    """Drop connected pieces with fewer than min_fraction x (largest piece's face count) faces; returns
    the mesh with vertices re-indexed and the number of pieces removed."""
    if min_fraction <= 0 or len(mesh.faces) == 0:
        return mesh, 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = mesh.faces.astype(np.int64)
    n = len(mesh.vertices)
    rows = np.concatenate([f[:, 0], f[:, 1]])
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    if n_comp == 1:
        return mesh, 0
    face_count = np.bincount(label[f[:, 0]], minlength=n_comp)
    keep_comp = face_count >= min_fraction * face_count.max()
    keep_comp &= face_count > 0
    keep_face = keep_comp[label[f[:, 0]]]
    used = np.zeros(n, bool)
    used[f[keep_face].ravel()] = True
    remap = np.cumsum(used) - 1
    out = Mesh(mesh.vertices[used], remap[f[keep_face]].astype(np.int32))
    return out, int((face_count > 0).sum() - keep_comp.sum())
