"""Marching cubes on a sparse set of grid cells, vectorised in torch (runs on CPU and GPU).

Uses the classic Lorensen/Bourke triangle table that scikit-image ships (its `method="lorensen"` path), so
the output matches `skimage.measure.marching_cubes(..., method="lorensen")` on the same values: every
vertex is the linear interpolation of the SDF along a grid edge whose end points change sign. Vertices are
shared between cells through a global edge key, so the mesh is indexed (no duplicate vertices).
"""

from __future__ import annotations

import base64
from functools import lru_cache

import numpy as np
import torch

# Corner c of a cell sits at cell + CORNERS[c] (Bourke numbering).
CORNERS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.int64
)
# Edge e joins corners EDGES[e, 0] -> EDGES[e, 1].
EDGES = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]], dtype=np.int64
)


_BIT = np.arange(8, dtype=np.int64)
_DEVICE_COPIES: dict[tuple[int, torch.device, torch.dtype | None], tuple[np.ndarray, torch.Tensor]] = {}


def on_device(table: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A device copy of a constant host table, made once: on a GPU every host-to-device copy is a launch and
    a wait. For module-level or cached arrays that are never modified (keyed by identity; the cache holds the
    array, so its id cannot be reused by another one)."""
    key = (id(table), torch.device(device), dtype)
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = (table, torch.as_tensor(table, device=device, dtype=dtype))
    return _DEVICE_COPIES[key][1]


@lru_cache(maxsize=None)
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from skimage.measure import _marching_cubes_lewiner_luts as luts

    shape, text = luts.CASESCLASSIC
    tri = np.frombuffer(base64.decodebytes(text.encode("ascii")), dtype=np.int8).reshape(shape).astype(np.int64)
    # Each edge as (lower corner, axis): the edge's lower end point and the axis it runs along.
    a, b = CORNERS[EDGES[:, 0]], CORNERS[EDGES[:, 1]]
    lower_corner = np.where((a <= b).all(axis=1), EDGES[:, 0], EDGES[:, 1])
    axis = np.abs(b - a).argmax(axis=1)
    upper_corner = EDGES.sum(axis=1) - lower_corner
    return tri, lower_corner, upper_corner, axis


def marching_cubes_cells(
    cells: torch.Tensor, values: torch.Tensor, points_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangulate the zero level set inside the given cells.

    cells: (M,3) long, index of each cell's lower corner in a grid of `points_shape` points.
    values: (M,8) SDF at the cells' corners in CORNERS order (negative inside).
    Returns vertices (V,3) in grid index units (float, same dtype as values) and faces (F,3) long, wound
    so that normals point toward increasing SDF (outward).
    """
    device = cells.device
    tri, lower, upper, axis = (on_device(a, device) for a in _tables())
    corners = on_device(CORNERS, device)

    bits = (values < 0).long() << on_device(_BIT, device)
    case = bits.sum(dim=1)
    entries = tri[case][:, :15]  # (M,15): up to 5 triangles of local edge ids, -1 padded
    cell_of_tri, slot = torch.nonzero(entries[:, ::3] >= 0).unbind(1)  # valid triangles (one host sync)
    local_edges = entries.view(-1, 5, 3)[cell_of_tri, slot]  # (T,3)
    if local_edges.shape[0] == 0:
        return values.new_zeros((0, 3)), torch.zeros((0, 3), dtype=torch.long, device=device)

    cell_rep = cell_of_tri[:, None].expand_as(local_edges).reshape(-1)
    e = local_edges.reshape(-1)
    start = cells[cell_rep] + corners[lower[e]]
    ny, nz = points_shape[1], points_shape[2]
    key = ((start[:, 0] * ny + start[:, 1]) * nz + start[:, 2]) * 3 + axis[e]
    uniq, inverse = torch.unique(key, return_inverse=True)

    # Interpolate from the edge's lower end so that every cell sharing the edge computes the same bits.
    va = values[cell_rep, lower[e]]
    vb = values[cell_rep, upper[e]]
    t = va / (va - vb)  # in [0,1]: the end points have opposite signs
    pos = start.to(values.dtype)
    pos[torch.arange(pos.shape[0], device=device), axis[e]] += t
    verts = values.new_zeros((uniq.shape[0], 3))
    verts[inverse] = pos
    faces = inverse.view(-1, 3)
    # Bourke's corner numbering is a mirror image of (x,y,z) index order, so its winding is inward here.
    return verts, faces[:, [0, 2, 1]]
