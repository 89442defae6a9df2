"""Sparse coarse-to-fine evaluation of an SDF's sign-changing cells, the fast path of
`extract.extract_mesh`.

Fast path (`extract_mesh`): coarse-to-fine sparse evaluation. Start from a coarse lattice of cells of side
a = S*h (h = voxel, S a power of two). Marching cubes only looks at the signs of lattice points and at the
values on the corners of sign-changing fine cells, so a cell is subdivided unless every fine lattice point p
inside it is certified to share its corners' sign: some corner c has |sdf(c)| > L_cell |p - c| (then sdf
cannot reach zero between c and p). Cells up to stride 4 are checked at every fine lattice point; coarser
ones on a 5^3 check lattice with a margin of half its spacing (which certifies the whole cell).

L_cell bounds |grad sdf| in the cell: max(L0, 1.25 x the cell's finite-difference gradient norm, per axis the
steepest of its 4 parallel edges). L0 (`lipschitz`, default 2.5 for any field) is 1.5 for the trained model
(tuning.EXTRACT_LIPSCHITZ): the eikonal-trained field has |grad| ~ 1 at the surface and <= ~2.1 anywhere
on the lattices measured; 1.5 gave the same meshes as 2.5 on the trained heads. This is a bound assumed,
not proven (a neural field has no certified Lipschitz constant); stats report the largest L_cell used and
the steepest slope seen.

Last level (stride 2 -> 1, `_final_level`): not every fine point of a kept cell is evaluated. A point is
certified by a parent corner as above; the uncertified points are evaluated (stage A), which fixes every
fine lattice sign and hence the sign-changing fine cells; then only the certified corners of those cells
are evaluated (stage B). Every corner value marching cubes sees is an evaluated one, so the mesh is the
dense one wherever the bound holds. Measured on the trained model (cached dense volumes): 64^3 26.8k
points (old band: 85.5k), 128^3 119k (old: 371k); the corners of the sign-changing cells alone are 15k and
62.5k.

Approximate coarse levels (`coarse=CoarseSdf(fn, error, exact_above)`): the levels above the last may take
a cheaper field within `error` of sdf_fn (the session passes HeadSdf.approximate: no exact pass near zero,
which cost a host sync and a second network pass per level on the GPU). Every certificate then needs
|value| - error > L |p - c|, and reused corner values below `exact_above` are evaluated again through sdf_fn
where the last level needs them, so marching cubes sees the same values as without it.

The result (the sign-changing fine cells and their corner values) goes to marching cubes in engine/extract.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .extract_grid import Grid, SdfFn, _check_finite, _evaluate, _keys, _unkey, make_grid
from .mc import CORNERS, EDGES, on_device

SLOPE_MARGIN = 1.25  # per-cell L is at least this x the steepest slope seen along the cell's own edges
CHECK_DIVISIONS = 4  # cells up to this stride are tested at every fine lattice point inside them


@dataclass(frozen=True)
class CoarseSdf:
    """A cheaper evaluation for the levels above the last (`extract_mesh(coarse=...)`): within `error` of
    sdf_fn everywhere, and where |value| >= `exact_above` as good as sdf_fn's own value (e.g. sdf_fn refines
    only values nearer zero). The cell tests subtract `error` from every |value|; the last level evaluates
    again, through sdf_fn, each reused corner value below `exact_above` that it needs."""

    fn: SdfFn
    error: float
    exact_above: float


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
    handle_repair: dict = field(default_factory=dict)  # handle_repair.RepairStats, when extract_mesh repaired
    seconds: dict[str, float] = field(default_factory=dict)



def _coarse_stride(resolution: int, coarse_cells: int) -> int:
    stride = 1
    while resolution // (stride * 2) >= coarse_cells:
        stride *= 2
    return stride



@lru_cache(maxsize=None)
def _cover_table(stride: int) -> np.ndarray:
    """Check points of a cell of side 1: (P, 8) distances to its 8 corners plus the margin (a fraction of the
    side) that makes covering the check points cover the whole cell. Up to stride 4 the check points are
    exactly the fine lattice points inside the cell (margin 0): only their signs matter to marching cubes.
    Coarser cells use a 5^3 lattice and a margin of half its diagonal."""
    m = min(stride, CHECK_DIVISIONS)
    u = np.stack(np.meshgrid(*[np.arange(m + 1) / m] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(u[:, None, :] - CORNERS[None, :, :], axis=-1)
    return dist + (0.0 if m == stride else math.sqrt(3.0) / (2 * m))


def _may_change_sign(corner_values: torch.Tensor, side: float, stride: int, lipschitz: float,
                     slopes: list[torch.Tensor], error: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,8) corner values of cells of side `side` (metres) spanning `stride` fine cells -> (M,) bool, False
    only where every fine lattice point inside provably has the corners' common sign, and the per-cell L.
    `error`: the values are within it of the field's (a certificate needs |value| - error > L |p - c|).
    Appends the largest slope seen to `slopes` (a device scalar: read once at the end, not a sync a level).
    On CUDA one Triton kernel does the same arithmetic (engine/cell_kernel.py)."""
    dist = on_device(_cover_table(stride), corner_values.device, corner_values.dtype) * side
    if corner_values.is_cuda:
        from . import cell_kernel  # Triton loads only here (a CPU cold start does not pay for it)

        if cell_kernel.available(corner_values.device):
            if corner_values.shape[0] == 0:
                return torch.zeros(0, dtype=torch.bool, device=corner_values.device), corner_values.new_zeros(0)
            keep, bound, slope_max = cell_kernel.cell_test(corner_values, dist, side, lipschitz, SLOPE_MARGIN, error)
            slopes.append(slope_max)
            return keep, bound
    edges = on_device(EDGES, corner_values.device)
    # Gradient-norm estimate: per axis the steepest of the 4 parallel edges (EDGES lists x, y, x, y, x, y,
    # x, y, then 4 along z), combined over the axes (one edge's slope alone can be 1/sqrt(3) of |grad|).
    diff = (corner_values[:, edges[:, 0]] - corner_values[:, edges[:, 1]]).abs()
    per_axis = torch.stack([diff[:, 0:8:2].amax(1), diff[:, 1:8:2].amax(1), diff[:, 8:12].amax(1)], 1)
    slope = per_axis.norm(dim=1) / side
    bound = torch.clamp_min(SLOPE_MARGIN * slope, lipschitz)  # per-cell L
    if slope.shape[0]:
        slopes.append(slope.max())
    mixed = (corner_values.amin(dim=1) < 0) & (corner_values.amax(dim=1) >= 0)
    absval = corner_values.abs() - error
    covered = torch.empty_like(mixed)
    step = max(1, (1 << 24) // dist.numel())
    for s in range(0, absval.shape[0], step):  # (cells, check points, corners) in bounded pieces
        a, b = absval[s : s + step], bound[s : s + step]
        covered[s : s + step] = (a[:, None, :] - b[:, None, None] * dist).amax(dim=2).amin(dim=1) > 0
    return mixed | ~covered, bound


@lru_cache(maxsize=None)
def _final_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a stride-2 cell: its 27 fine lattice points (offsets in {0,1,2}^3), their distances (in fine
    voxels) to the cell's 8 corners, which of the 27 each corner is, and, for each of the 8 child cells,
    which of the 27 its 8 corners are."""
    off = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(off[:, None, :] - 2 * CORNERS[None, :, :], axis=-1)
    index = lambda o: (o[..., 0] * 3 + o[..., 1]) * 3 + o[..., 2]  # noqa: E731
    return off, dist, index(2 * CORNERS), index(CORNERS[:, None, :] + CORNERS[None, :, :])


def _final_level(sdf_fn: SdfFn, grid: Grid, cells: torch.Tensor, corner_values: torch.Tensor,
                 bound: torch.Tensor, chunk: int, stats: ExtractStats, samples: list | None, finite: list,
                 coarse: CoarseSdf | None) -> tuple[torch.Tensor, torch.Tensor]:
    """From kept stride-2 cells to the sign-changing fine cells, evaluating as few fine points as the bound
    allows. A fine point p is certified to have the sign of a parent corner c when |sdf(c)| > L |p - c|.
    Stage A evaluates every fine point no parent certifies (certificates of both signs count as none);
    the signs then give the sign-changing fine cells, and stage B evaluates the certified corners of those,
    so every corner value marching cubes sees is exact. With `coarse` (the corner values came from it), its
    error enters the certificates and reused values below its exact_above count as unknown (stage B evaluates
    those it needs). Returns (cells (C,3), corner values (C,8))."""
    dev = cells.device
    off, dist, corner_slot, child_slot = (on_device(t, dev) for t in _final_tables())
    h = grid.voxel
    shape = grid.points_shape
    error = coarse.error if coarse is not None else 0.0
    margin = (corner_values.abs() - error)[:, None, :] - bound[:, None, None] * (dist.to(corner_values.dtype) * h)
    best, which = margin.max(dim=2)  # (M,27)
    cert = best > 0
    cert_neg = torch.gather(corner_values < 0, 1, which)  # the certifying corner's sign
    keys, inverse = torch.unique(_keys(cells[:, None, :] * 2 + off, shape), return_inverse=True)
    n = keys.shape[0]
    # votes by scatter, not boolean-mask indexing (each mask index is a host sync); scatter_add_, not index_put_
    # with accumulate, which sorts the indices on CUDA (its cost: docs/benchmarks.md, "Engine tuning")
    flat = inverse.reshape(-1)
    neg_votes = torch.zeros(n, dtype=torch.int32, device=dev).scatter_add_(
        0, flat, (cert & cert_neg).reshape(-1).int()) > 0
    pos_votes = torch.zeros(n, dtype=torch.int32, device=dev).scatter_add_(
        0, flat, (cert & ~cert_neg).reshape(-1).int()) > 0
    values = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    reused = corner_values.float()
    if coarse is not None:
        reused = reused.masked_fill(reused.abs() < coarse.exact_above, float("nan"))
    values[inverse[:, corner_slot]] = reused
    known = ~torch.isnan(values)

    def evaluate(where: torch.Tensor) -> None:
        idx = torch.nonzero(where).squeeze(1)
        pts = _unkey(keys[idx], shape)
        vals = _evaluate(sdf_fn, grid.to_world(pts), chunk, finite)
        values[idx] = vals
        stats.points_evaluated += int(vals.shape[0])
        if samples is not None:
            samples.append((pts, vals))

    evaluate(~known & ~(neg_votes ^ pos_votes))  # stage A
    known = ~torch.isnan(values)
    neg = torch.where(known, values < 0, neg_votes)
    child = inverse[:, child_slot].reshape(-1, 8)  # (M*8, 8) point slots of the child cells' corners
    child_neg = neg[child]
    crossing = torch.nonzero(child_neg.any(dim=1) & ~child_neg.all(dim=1)).squeeze(1)
    child = child[crossing]
    need = torch.zeros(n, dtype=torch.bool, device=dev)
    need[child.reshape(-1)] = True
    evaluate(need & ~known)  # stage B
    fine_cells = (cells[:, None, :] * 2 + on_device(CORNERS, dev)[None]).reshape(-1, 3)[crossing]
    return fine_cells, values[child]


def _extract_once(
    sdf_fn: SdfFn,
    resolution: int,
    device: torch.device,
    lipschitz: float,
    coarse_cells: int,
    chunk: int,
    samples: list | None,
    coarse: CoarseSdf | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ExtractStats, Grid]:
    """The coarse-to-fine descent: returns the sign-changing fine cells and their corner values."""
    stride = _coarse_stride(resolution, coarse_cells)
    grid = make_grid(resolution, multiple=stride)
    dense = make_grid(resolution)
    stats = ExtractStats(resolution, grid.voxel, int(np.prod(dense.points_shape)), lipschitz=lipschitz)
    corners = on_device(CORNERS, device)
    slopes: list[torch.Tensor] = []
    finite: list[torch.Tensor] = []

    with torch.no_grad():
        # Top level: every point of the coarse lattice.
        shape = tuple(c // stride + 1 for c in grid.cells)
        cells = _unkey(torch.arange(math.prod(c - 1 for c in shape), device=device), tuple(c - 1 for c in shape))
        point_keys = torch.arange(math.prod(shape), device=device)
        inverse = point_keys  # each finer level indexes its corners through torch.unique's inverse
        if stride == 1:  # one level: its values go to marching cubes as they are
            coarse = None
        error = coarse.error if coarse is not None else 0.0
        while True:
            pts = _unkey(point_keys, shape)
            values = _evaluate(sdf_fn if coarse is None else coarse.fn, grid.to_world(pts * stride), chunk, finite)
            stats.points_evaluated += int(values.shape[0])
            if samples is not None:
                sure = slice(None) if coarse is None else values.abs() >= coarse.exact_above
                samples.append(((pts * stride)[sure], values[sure]))
            if point_keys.shape[0] == math.prod(shape):  # dense lattice: keys are positions
                corner_values = values[_keys(cells[:, None, :] + corners, shape)]
            else:
                corner_values = values[inverse].view(-1, 8)
            if stride == 1:
                break
            keep, bound = _may_change_sign(corner_values, stride * grid.voxel, stride, lipschitz, slopes, error)
            keep = torch.nonzero(keep).squeeze(1)  # one host sync, then plain indexing
            if stride == 2:
                cells, corner_values = _final_level(sdf_fn, grid, cells[keep], corner_values[keep], bound[keep],
                                                    chunk, stats, samples, finite, coarse)
                break
            cells = cells[keep]
            stride //= 2
            shape = tuple(c // stride + 1 for c in grid.cells)
            cells = (cells[:, None, :] * 2 + corners).reshape(-1, 3)
            point_keys, inverse = torch.unique(_keys(cells[:, None, :] + corners, shape), return_inverse=True)
        if stride == 1:  # a coarsest lattice of single voxels (resolution < 2 x coarse_cells): no descent
            crossing = (corner_values.amin(dim=1) < 0) & (corner_values.amax(dim=1) >= 0)
            cells, corner_values = cells[crossing], corner_values[crossing]
        _check_finite(finite)
        stats.cells_marched = int(cells.shape[0])
        if slopes:  # per-cell L = max(L0, SLOPE_MARGIN x slope), so the largest used follows from the steepest
            stats.lipschitz_observed = float(torch.stack(slopes).max())
            stats.lipschitz = max(lipschitz, SLOPE_MARGIN * stats.lipschitz_observed)
    return cells, corner_values, stats, grid
