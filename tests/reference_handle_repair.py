"""The handle repair's first version (commit 3794f7b of backend/engine/handle_repair.py), dense lattice work
throughout, with the later tests of a cut (_refused_cut: through a sheet, a notch, where the surface opener parts
the solid): the reference that tests/test_engine_handle_repair.py holds the fast version to (same cells and values
out, same stats)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# The constants, the stats, the per-case Euler characteristic and the sheet test (a small box around a cut plug)
# are the fast version's own (the chi table is tested against the meshes' V - E + F directly, the sheet test on its
# own lattice); the reference pins the lattice work.
from backend.engine.handle_repair import (MAX_PLUG_MM2, MAX_RADIUS, MIN_VALUE, PLUG_SEEDS, Evaluate, Parted,
                                          RepairStats, _chi_table, _refused_cut, _toggle)
from backend.engine.mc import CORNERS

_CUBE = np.ones((3, 3, 3), bool)
_CROSS = ndimage.generate_binary_structure(3, 1)


def _cases(inside: np.ndarray) -> np.ndarray:
    """Marching-cubes case of every cell of a boolean lattice (bit c: corner c inside, mc.CORNERS order)."""
    shape = tuple(s - 1 for s in inside.shape)
    case = np.zeros(shape, np.uint8)
    for bit, (a, b, c) in enumerate(CORNERS):
        case |= inside[a:a + shape[0], b:b + shape[1], c:c + shape[2]].astype(np.uint8) << np.uint8(bit)
    return case


def dense_signs(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sign-changing cells (M,3) and their corner values (M,8) -> (inside (shape) bool, value (shape) float32,
    NaN where only the sign is known)."""
    value = np.full(shape, np.nan, np.float32)
    corners = (cells[:, None, :] + CORNERS[None]).reshape(-1, 3)
    value[tuple(corners.T)] = values.reshape(-1)
    known = ~np.isnan(value)
    label, n = ndimage.label(~known)
    padded = np.pad(label, 1)
    votes = np.zeros(n + 1, np.int64)
    for axis in range(3):
        for step in (1, -1):
            window = [slice(1, -1)] * 3
            window[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            beside = padded[tuple(window)]
            at = known & (beside > 0)
            np.add.at(votes, beside[at], np.where(value[at] < 0, 1, -1))
    return np.where(known, value < 0, votes[label] > 0), value


def _candidates(inside: np.ndarray, radius: int, fill: bool) -> np.ndarray:
    pad = radius + 1
    if fill:
        closed = ndimage.binary_closing(np.pad(inside, pad), _CROSS, iterations=radius)
        out = closed[pad:-pad, pad:-pad, pad:-pad] & ~inside
    else:
        out = inside & ~ndimage.binary_opening(inside, _CROSS, iterations=radius)
    out[[0, -1]] = out[:, [0, -1]] = out[:, :, [0, -1]] = False  # the box's faces: the mesh may end there
    return out


def _cluster_chi(inside: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per cluster of `label` (>0), the Euler characteristic change of flipping all of it (cells touching a
    cluster touch only it: a cell's corners are 26-neighbours)."""
    shape = tuple(s - 1 for s in inside.shape)
    cell_label = np.zeros(shape, label.dtype)
    for a, b, c in CORNERS:
        np.maximum(cell_label, label[a:a + shape[0], b:b + shape[1], c:c + shape[2]], out=cell_label)
    at = cell_label > 0
    table = _chi_table()
    change = table[_cases(inside ^ (label > 0))[at]] - table[_cases(inside)[at]]
    return np.bincount(cell_label[at], weights=change, minlength=int(label.max()) + 1)


def _flip_chi(inside: np.ndarray, point: tuple[int, int, int]) -> float:
    """Euler characteristic change of flipping one lattice point (its up to 8 cells)."""
    lo = [max(p - 1, 0) for p in point]
    window = inside[lo[0]:point[0] + 2, lo[1]:point[1] + 2, lo[2]:point[2] + 2]
    after = window.copy()
    after[tuple(p - q for p, q in zip(point, lo))] ^= True
    table = _chi_table()
    return float(table[_cases(after)].sum() - table[_cases(window)].sum())


def _plug(inside: np.ndarray, points: np.ndarray, priority: np.ndarray, target: float, limit: int
          ) -> list[tuple[int, int, int]] | None:
    """The smallest set of `points` (a cluster) whose flip raises the Euler characteristic by `target`, grown
    breadth-first through the cluster from each of its PLUG_SEEDS points of least priority (|SDF|: the
    narrowest part); flipped in `inside`. None (nothing flipped) if no seed does it within `limit` points."""
    best: list[tuple[int, int, int]] | None = None
    for seed in np.argsort(priority, kind="stable")[:PLUG_SEEDS]:
        order = _grow_order(points, priority, int(seed), limit)
        rise, done = 0.0, []
        for i in order[: limit if best is None else len(best) - 1]:
            p = (int(points[i, 0]), int(points[i, 1]), int(points[i, 2]))
            rise += _flip_chi(inside, p)
            inside[p] ^= True
            done.append(p)
            if rise >= target:
                best = list(done)
                break
        _toggle(inside, done)
    if best is not None:
        _toggle(inside, best)
    return best


def _grow_order(points: np.ndarray, priority: np.ndarray, seed: int, limit: int) -> np.ndarray:
    """Indices of a cluster's points (P,3) in breadth-first order (26-neighbours) from `seed`, each layer in
    order of priority; the layers up to the one that reaches `limit` points."""
    lo = points.min(0)
    local = points - lo
    mask = np.zeros(tuple(local.max(0) + 1), bool)
    mask[tuple(local.T)] = True
    layer = np.full(mask.shape, -1, np.int64)
    front = np.zeros_like(mask)
    front[tuple(local[seed])] = True
    reached = front.copy()
    step, count = 0, 1  # count: points with a layer, the front's included
    while front.any():
        layer[front] = step
        if count >= limit:
            break
        grown = ndimage.binary_dilation(front, _CUBE) & mask & ~reached
        reached |= grown
        front, step, count = grown, step + 1, count + int(grown.sum())
    depth = layer[tuple(local.T)]
    keep = np.flatnonzero(depth >= 0)
    return keep[np.lexsort((priority[keep], depth[keep]))]


def _keeps_components(inside: np.ndarray, plug: list[tuple[int, int, int]], solid: bool, count: int) -> bool:
    """Flip the plug; undo it if it split off a piece of solid or enclosed a pocket of air (solid False)."""
    _toggle(inside, plug)
    if _components(inside, solid) > count:
        _toggle(inside, plug)
        return False
    return True


def _components(inside: np.ndarray, solid: bool) -> int:
    return int(ndimage.label(inside if solid else np.pad(~inside, 1, constant_values=True), _CUBE)[1])


def repair_handles(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int, int], voxel: float,
                   evaluate: Evaluate, parted: Parted | None = None) -> tuple[np.ndarray, np.ndarray, RepairStats]:
    """The sign-changing cells (M,3) and corner values (M,8) of an extraction (lattice of `shape` points,
    `voxel` metres apart) with small handles removed (module docstring); `evaluate` gives the SDF at lattice
    points whose value the sparse extraction only certified; `parted` as in the fast version."""
    stats = RepairStats()
    inside, value = dense_signs(cells, values, shape)
    before = inside.copy()
    magnitude = np.where(np.isnan(value), np.inf, np.abs(value))
    limit = max(1, int(MAX_PLUG_MM2 * 1e-6 / voxel**2))
    counts = {solid: _components(inside, solid) for solid in (True, False)}  # pieces of solid, of air
    for radius in range(1, MAX_RADIUS + 1):
        for fill in (True, False):
            label, _ = ndimage.label(_candidates(inside, radius, fill), _CUBE)
            change = _cluster_chi(inside, label)
            plugs = []
            for cluster in np.flatnonzero(change > 0):
                points = np.argwhere(label == cluster)
                plug = _plug(inside, points, magnitude[tuple(points.T)], change[cluster], limit)
                if plug is None:
                    stats.plugs_too_large += 1
                elif fill or not _refused_cut(inside, plug, value, stats, parted):
                    plugs.append((plug, change[cluster]))
            if not plugs:
                continue
            # a fill can enclose a pocket of air, a cut split off a piece of solid (rare: then plug by plug)
            count = _components(inside, not fill)
            if count > counts[not fill]:
                _toggle(inside, [p for plug, _ in plugs for p in plug])
                plugs = [(p, c) for p, c in plugs if _keeps_components(inside, p, not fill, counts[not fill])]
                count = _components(inside, not fill)
            counts[not fill] = count
            stats.handles_removed += sum(int(round(c / 2)) for _, c in plugs)
    flipped = inside ^ before
    if not flipped.any():
        return cells, values, stats
    stats.points_filled = int((flipped & inside).sum())
    stats.points_cut = int((flipped & ~inside).sum())
    return (*_remarch(cells, values, inside, value, flipped, evaluate, stats), stats)


def _remarch(cells: np.ndarray, values: np.ndarray, inside: np.ndarray, value: np.ndarray, flipped: np.ndarray,
             evaluate: Evaluate, stats: RepairStats) -> tuple[np.ndarray, np.ndarray]:
    """The cells touching a flipped point replaced by the sign-changing ones of the new signs, with values."""
    shape = inside.shape
    touched = np.zeros(tuple(s - 1 for s in shape), bool)
    for a, b, c in CORNERS:  # cell (i,j,k) has corner (i,j,k) + offset
        touched |= flipped[a:a + touched.shape[0], b:b + touched.shape[1], c:c + touched.shape[2]]
    keep = ~touched[tuple(cells.T)]
    case = _cases(inside)
    new = np.argwhere(touched & (case > 0) & (case < 255))
    corners = new[:, None, :] + CORNERS[None]
    unknown = np.unique(corners.reshape(-1, 3)[np.isnan(value[tuple(corners.reshape(-1, 3).T)])], axis=0)
    if len(unknown):
        value[tuple(unknown.T)] = evaluate(unknown)
        stats.points_evaluated = len(unknown)
    v = np.abs(value[tuple(corners.reshape(-1, 3).T)]).reshape(-1, 8).astype(np.float32)
    v = np.maximum(v, MIN_VALUE)
    v = np.where(inside[tuple(corners.reshape(-1, 3).T)].reshape(-1, 8), -v, v)  # the lattice's (new) signs
    return (np.concatenate([cells[keep], new.astype(cells.dtype)]),
            np.concatenate([values[keep], v.astype(values.dtype)]))
