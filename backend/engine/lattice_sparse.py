"""Lattice work for the handle repair (engine/handle_repair.py) at the cost of the surface band, not the volume:
closings and openings on a lattice packed 8 points a byte (np.packbits' order along axis 0), 26-connected
clusters and marching-cubes cases of sparse point sets, and whether removing a few points from a set splits
one of its pieces (decided in a box around them when it can be, on the whole lattice when it cannot)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra

from .mc import CORNERS

PAD = 4  # False points around the packed lattice: more than a closing's or opening's reach (MAX_RADIUS 3)
SPLIT_MARGINS = (4, 12, 32)  # voxels around a removed plug searched for a path joining its neighbours
WHOLE_PIECE_POINTS = 4_000_000  # the largest box grown around a piece that a removed plug may have split off
_CUBE = np.ones((3, 3, 3), bool)
_OFFSETS = np.array(list(np.ndindex(3, 3, 3))) - 1  # the 26 neighbour offsets and 0
_FORWARD = _OFFSETS[14:]  # 13 of them: one of each opposite pair
_UINT8 = np.uint8


def pack(inside: np.ndarray) -> np.ndarray:
    """(shape) bool -> uint8 (ceil((n0 + 2 PAD) / 8), n1 + 2 PAD, n2 + 2 PAD), PAD False points around."""
    n0, n1, n2 = inside.shape
    full = np.zeros((-(-(n0 + 2 * PAD) // 8) * 8, n1 + 2 * PAD, n2 + 2 * PAD), bool)
    full[PAD:PAD + n0, PAD:PAD + n1, PAD:PAD + n2] = inside
    return np.packbits(full, axis=0)


def toggle_packed(packed: np.ndarray, points: np.ndarray) -> None:
    """Flip lattice points (N,3) of a packed lattice in place (each at most once)."""
    i = points[:, 0] + PAD
    np.bitwise_xor.at(packed, (i // 8, points[:, 1] + PAD, points[:, 2] + PAD), (0x80 >> (i % 8)).astype(_UINT8))


def _cross_step(x: np.ndarray, grow: bool) -> np.ndarray:
    """One dilation (grow) or erosion by the 6-neighbour cross; outside the array counts as False."""
    y = x.copy()
    combine = np.bitwise_or if grow else np.bitwise_and
    before = x >> _UINT8(1)  # point i takes point i - 1 (bits are most significant first)
    before[1:] |= x[:-1] << _UINT8(7)
    after = x << _UINT8(1)
    after[:-1] |= x[1:] >> _UINT8(7)
    combine(y, before, out=y)
    combine(y, after, out=y)
    for axis in (1, 2):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        combine(y[tuple(hi)], x[tuple(lo)], out=y[tuple(hi)])
        combine(y[tuple(lo)], x[tuple(hi)], out=y[tuple(lo)])
        if not grow:
            for end in (0, -1):
                edge: list[slice | int] = [slice(None)] * 3
                edge[axis] = end
                y[tuple(edge)] = 0
    return y


def candidates(packed: np.ndarray, shape: tuple[int, ...], radius: int, fill: bool) -> np.ndarray:
    """Lattice points (N,3), in C order, that a closing (fill: air made solid) or an opening (solid made air) of
    `radius` by the cross changes, as scipy.ndimage computes them with air around the lattice; none on the
    lattice's faces (the mesh may end there)."""
    if radius >= PAD:
        raise ValueError(f"a closing of radius {radius} reaches past the packed lattice's {PAD} points of air")
    x = packed
    for grow in (fill, not fill):
        for _ in range(radius):
            x = _cross_step(x, grow)
    changed: np.ndarray = x & ~packed if fill else packed & ~x
    b, j, k = np.nonzero(changed)
    row, bit = np.nonzero(np.unpackbits(changed[b, j, k][:, None], axis=1))
    points = np.stack([b[row] * 8 + bit, j[row], k[row]], axis=1) - PAD
    inner = ((points >= 1) & (points <= np.array(shape) - 2)).all(axis=1)
    points = points[inner]
    return points[np.argsort(flat(points, shape), kind="stable")]


def flat(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (points[:, 0] * shape[1] + points[:, 1]) * shape[2] + points[:, 2]


def _neighbours(points: np.ndarray, shape: tuple[int, ...]) -> coo_matrix:
    """The 26-neighbour graph of points (N,3) in C order, none on the lattice's faces (no key wraps)."""
    keys = flat(points, shape)
    a, b = [], []
    for d in _FORWARD:
        target = keys + int(flat(d[None], shape)[0])
        at = np.minimum(np.searchsorted(keys, target), len(keys) - 1)
        hit = np.flatnonzero(keys[at] == target)
        a.append(hit)
        b.append(at[hit])
    i, j = np.concatenate(a), np.concatenate(b)
    return coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(keys), len(keys)))


def hops(points: np.ndarray, shape: tuple[int, ...], seeds: np.ndarray) -> np.ndarray:
    """(len(seeds), N) 26-neighbour steps from each seed to each of the points (N,3) (a connected cluster, C
    order, off the faces)."""
    graph = _neighbours(points, shape).tocsr()
    return dijkstra(graph, directed=False, indices=seeds, unweighted=True).astype(np.int64)


def clusters(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """26-connected clusters of points (N,3) in C order, none on the lattice's faces: labels (N,) 1..n numbered
    as scipy.ndimage.label numbers them (by each cluster's first point in C order)."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    comp = connected_components(_neighbours(points, shape), directed=False)[1]
    _, first = np.unique(comp, return_index=True)  # each component's first point
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[comp] + 1


def touching_cells(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The cells (M,3), in C order, with a corner among the points (N,3)."""
    cells = (points[:, None, :] - CORNERS[None]).reshape(-1, 3)
    cells = cells[((cells >= 0) & (cells <= np.array(shape) - 2)).all(axis=1)]
    cell_shape = tuple(s - 1 for s in shape)
    keys = np.unique(flat(cells, cell_shape))
    return np.stack(np.unravel_index(keys, cell_shape), axis=1)


def cases(inside: np.ndarray, cells: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
    """Marching-cubes case of cells (M,3) (bit c: corner c inside); `flip` (M,8) bool: corners taken flipped."""
    corner = inside[tuple((cells[:, None, :] + CORNERS[None]).reshape(-1, 3).T)].reshape(-1, 8)
    if flip is not None:
        corner = corner ^ flip
    return (corner.astype(np.int64) << np.arange(8)).sum(axis=1)


def lookup(points: np.ndarray, keys: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """values[i] where points (..., 3) is the point of the i-th of the sorted, non-empty `keys`, else 0."""
    target = flat(points.reshape(-1, 3), shape)
    at = np.minimum(np.searchsorted(keys, target), len(keys) - 1)
    return np.where(keys[at] == target, values[at], 0).reshape(points.shape[:-1])


def splits(inside: np.ndarray, plug: np.ndarray, solid: bool) -> bool:
    """Whether the plug's points (N,3, 26-connected, already flipped out of the set) split a 26-connected piece
    of solid (solid True) or of air (air around the lattice, connected): whether its neighbours in the set are
    no longer joined. Decided in a box around the plug where a path joins them or one of their pieces lies in
    the box whole; else in a box grown around one of those pieces until it holds it whole; else on the whole
    lattice."""
    near = (plug[:, None, :] + _OFFSETS[None]).reshape(-1, 3)
    near = near[((near >= 0) & (near < inside.shape)).all(axis=1)]
    near = near[inside[tuple(near.T)] == solid]
    if len(near) == 0:
        return False
    for margin in SPLIT_MARGINS:
        lo = plug.min(axis=0) - margin
        label = ndimage.label(_box(inside, solid, lo, plug.max(axis=0) + margin + 1), _CUBE)[0]
        pieces = label[tuple((near - lo).T)]
        if (pieces == pieces[0]).all():
            return False
        if not _at_faces(label)[pieces].all():
            return True
    for first in np.unique(pieces, return_index=True)[1]:  # one neighbour in each piece
        held = _whole_piece(inside, solid, near[first])
        if held is not None:
            piece, lo = held
            inner = near - lo
            inner = inner[((inner >= 0) & (inner < piece.shape)).all(axis=1)]
            return int(piece[tuple(inner.T)].sum()) < len(near)
    member = inside if solid else np.pad(~inside, 1, constant_values=True)
    label = ndimage.label(member, _CUBE)[0]
    pieces = label[tuple((near + (0 if solid else 1)).T)]
    return not (pieces == pieces[0]).all()


def _box(inside: np.ndarray, solid: bool, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The set (solid, or air) over lattice points lo..hi - 1; outside the lattice: air."""
    box = np.full(tuple(hi - lo), not solid)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, inside.shape)
    part = inside[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    box[tuple(slice(a - o, b - o) for a, b, o in zip(src_lo, src_hi, lo))] = part if solid else ~part
    return box


def _at_faces(label: np.ndarray) -> np.ndarray:
    """Per label of a box, whether it reaches the box's faces."""
    out = np.zeros(int(label.max()) + 1, bool)
    for axis in range(3):
        out[np.take(label, [0, -1], axis=axis)] = True
    return out


def _whole_piece(inside: np.ndarray, solid: bool, point: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The piece of the set holding `point` (mask over a box, the box's first point) if a box of at most
    WHOLE_PIECE_POINTS holds it (grown by doubling towards the faces it reaches); None if none does, or if it is
    air joined to the air around the lattice."""
    shape = np.array(inside.shape)
    lo, hi = point - 8, point + 9
    while np.prod(hi - lo) <= WHOLE_PIECE_POINTS:
        label = ndimage.label(_box(inside, solid, lo, hi), _CUBE)[0]
        piece = label == label[tuple(point - lo)]
        in_lattice = tuple(slice(max(-a, 0), b - a) for a, b in zip(lo, shape))
        if not solid and piece[in_lattice].sum() < piece.sum():
            return None  # air joined to the air around the lattice
        grown = False
        for axis in range(3):
            width = hi[axis] - lo[axis]
            if np.take(piece, 0, axis=axis).any() and lo[axis] > -1:
                lo[axis], grown = max(lo[axis] - width, -1), True
            if np.take(piece, -1, axis=axis).any() and hi[axis] < shape[axis] + 1:
                hi[axis], grown = min(hi[axis] + width, shape[axis] + 1), True
        if not grown:
            return piece, lo
    return None
