"""Removing small handles (tunnels) from an extraction's sign lattice before marching cubes (docs/surface.md).

The model is not exact where the head is thin: the lips' corners, nostrils, ears and the mouth's inner shell
get air passages through solid or thin solid bridges across air, each a handle of the surface (genus). A handle
that a morphological closing (air passage) or opening (solid bridge) of radius r voxels removes is repaired by
flipping the signs of a few lattice points, smallest radius first, then the smallest plug:

1. the dense signs come from the sparse extraction: the sign-changing cells' corners are known, and along a
   lattice line the sign changes only across those cells' edges (dense_signs);
2. for r = 1..MAX_RADIUS with r voxels <= MAX_REACH_MM, fills (closing minus the solid) then cuts (the solid minus
   the opening), computed on a lattice packed 8 points a byte (engine/lattice_sparse.py; the rest of the work is
   on the candidate points and the cells around them, not the volume): each 26-connected cluster of candidates is
   kept only if flipping it raises the mesh's Euler characteristic (chi of marching cubes' own triangulation,
   summed per cell from its case: `_chi_table`; +2 is one handle less). Of a kept cluster only a plug is flipped:
   its points in order of |SDF| (the narrowest part of the passage or bridge first) until the Euler characteristic
   has risen as much, at most MAX_PLUG_MM2 / voxel^2 points; a plug that splits off a piece of solid or encloses a
   pocket of air is undone (lattice_sparse.splits), and so is a cut that opens a passage through a sheet thicker
   than MAX_SHEET_MM (_through_sheet: where a lip meets the other only diagonally, marching cubes' own passages
   make a handle that a cut through the lip beside them removes; that leaves a hole in the lip, while the mesh's
   handle cut, engine/handle_cut.py, removes the same handle along a loop of a few mm), and so is a cut that
   carves a notch deeper than MAX_NOTCH_MM / 2 out of solid that stays one piece around it (_notch: at a mouth
   corner a block of both lips, a hole into the mouth), and so is a cut whose sides the surface opener's
   expressions part (`parted`: where the lips touch, the opener's slit opens the contact along the motion's jump;
   a lattice cut there took the upper lip's rim off seed 0's slit at 96);
3. marching cubes then runs on the changed cells. Lattice edges without a flipped end keep their values, so
   every vertex away from a plug is bitwise the one without the repair; a plug point's value is its SDF with
   the sign flipped (points whose value was only certified are evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import ndimage

from . import lattice_sparse as ls
from .mc import CORNERS, EDGES, _tables

MAX_RADIUS = 3  # voxels: passages and bridges up to about 2 r + 1 voxels across
# and at most this many mm: on a coarse lattice (a preview, a fit's scan at 32-64) one flipped point is a
# large piece of surface, so the reach shrinks with the voxel and below ~100 cells nothing is repaired
MAX_REACH_MM = 9.5
MAX_PLUG_MM2 = 500.0  # a plug's points x voxel^2: larger plugs are not flipped (not a thin passage or bridge)
PLUG_SEEDS = 4  # plugs grown from this many of a cluster's narrowest points (the smallest kept)
MIN_VALUE = 1e-7  # m: a flipped value's smallest magnitude (a 0 would count as outside on both sides)
# a cut may open a passage through a sheet (join air that is apart around it) only where the sheet is at most this
# thick, twice its deepest point's |SDF|: the film where the lips touch, not a lip or a nostril's wall
MAX_SHEET_MM = 2.0
SHEET_MARGIN = 2  # voxels around a cut plug in which the air on its sides is apart or joined
# a cut whose solid around it stays one piece (a notch carved into a body, not a bridge cut through) is made only
# where its deepest point is at most half this deep, as for a sheet: seed 2's mouth corner at 96, seed 6's upper lip
# at 128 (docs/surface.md, 2026-12-07)
MAX_NOTCH_MM = 2.0
_CROSS = ndimage.generate_binary_structure(3, 1)
_STEPS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
_OFFSETS = np.argwhere(np.ones((3, 3, 3), bool)) - 1  # a point's 26 neighbours and itself
# corner pairs (lower, upper) of a cell's 4 edges along axis 0
_AXIS0_EDGES = [(int(a), int(b)) if CORNERS[a, 0] < CORNERS[b, 0] else (int(b), int(a))
                for a, b in EDGES if CORNERS[a, 0] != CORNERS[b, 0]]

Evaluate = Callable[[np.ndarray], np.ndarray]  # lattice indices (N,3) -> SDF values (N,)
# lattice indices (N,3) -> whether the surface opener's expressions part those points (open_surface.parted)
Parted = Callable[[np.ndarray], bool]


@dataclass
class RepairStats:
    handles_removed: int = 0  # Euler characteristic raised / 2
    points_filled: int = 0  # air lattice points made solid
    points_cut: int = 0  # solid lattice points made air
    points_evaluated: int = 0  # certified-only lattice points whose value the changed cells needed
    plugs_too_large: int = 0  # clusters that would have removed a handle with a plug above MAX_PLUG_MM2
    plugs_through_sheet: int = 0  # cuts not made: they would have opened a passage through a sheet (MAX_SHEET_MM)
    plugs_notch: int = 0  # cuts not made: a notch deeper than MAX_NOTCH_MM / 2 into solid that stays one piece
    plugs_parted: int = 0  # cuts not made: the surface opener's expressions part their sides (it slits there)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@lru_cache(maxsize=None)
def _chi_table() -> np.ndarray:
    """(256,) each marching-cubes case's share of the mesh's V - E + F: its triangles, minus its edges inside the
    cell, minus half its edges on a cell face (two cells share them), plus a quarter of its vertices (each on a
    lattice edge of four cells). Summed over the cells it is the mesh's Euler characteristic."""
    tri = _tables()[0]
    out = np.zeros(256)
    for case in range(256):
        t = tri[case][:15]
        t = t[: int((t >= 0).sum())].reshape(-1, 3)
        edges = {(min(p, q), max(p, q)) for a, b, c in t.tolist() for p, q in ((a, b), (b, c), (c, a))}
        chi = len(t) + len(np.unique(t)) / 4
        for p, q in edges:
            ends = CORNERS[np.r_[EDGES[p], EDGES[q]]]
            chi -= 0.5 if (ends == ends[0]).all(axis=0).any() else 1.0
        out[case] = chi
    return out


def dense_signs(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sign-changing cells (M,3) and their corner values (M,8) -> (inside (shape) bool, value (shape) float32,
    NaN where only the sign is known). Along a lattice line the sign changes only across sign-changing edges,
    whose ends are cells' corners: each line along axis 0 starts with its first corner's sign and flips at
    those edges; a line without corners has the sign of the lines beside it (a point beside a corner has the
    corner's sign, else both lie in one corner-free region)."""
    value = np.full(shape, np.nan, np.float32)
    corners = (cells[:, None, :] + CORNERS[None]).reshape(-1, 3)
    value[tuple(corners.T)] = values.reshape(-1)
    if len(cells) == 0:
        return np.zeros(shape, bool), value
    flip = np.zeros(shape, bool)
    for lo, hi in _AXIS0_EDGES:  # the cells' edges along axis 0 whose ends differ in sign
        change = (values[:, lo] < 0) != (values[:, hi] < 0)
        flip[tuple((cells[change] + CORNERS[hi]).T)] = True
    known = ~np.isnan(value)
    first = known.argmax(axis=0)  # each line's first corner (0 if it has none)
    line = np.ix_(np.arange(shape[1]), np.arange(shape[2]))
    start = value[(first, *line)] < 0
    empty = ~known.any(axis=0)
    if empty.any():
        start = _fill_empty_lines(start, empty)
    return np.logical_xor.accumulate(flip, axis=0) ^ start, value


def _fill_empty_lines(start: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The starting signs (n1,n2) of lines without corners: one per 4-connected group of them, taken from a
    line with corners beside the group."""
    label, n = ndimage.label(empty)
    sign = np.zeros(n + 1, bool)
    for axis in (0, 1):
        for step in (1, -1):
            there = np.roll(np.arange(empty.shape[axis]), -step)  # index of the line beside, wrapping ...
            inner = np.arange(empty.shape[axis]) + step
            valid = (inner >= 0) & (inner < empty.shape[axis])  # ... which is only used inside the lattice
            beside_empty = np.take(empty, there, axis=axis)
            beside_start = np.take(start, there, axis=axis)
            at = empty & ~beside_empty & np.expand_dims(valid, 1 - axis)
            sign[label[at]] = beside_start[at]
    return np.where(empty, sign[label], start)


def _cluster_chi(inside: np.ndarray, points: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per cluster (label (N,) 1..n of points (N,3)), the Euler characteristic change of flipping all of it
    (cells touching a cluster touch only it: a cell's corners are 26-neighbours)."""
    shape = inside.shape
    cells = ls.touching_cells(points, shape)
    corner_label = ls.lookup(cells[:, None, :] + CORNERS[None], ls.flat(points, shape), label, shape)
    table = _chi_table()
    change = table[ls.cases(inside, cells, corner_label > 0)] - table[ls.cases(inside, cells)]
    return np.bincount(corner_label.max(axis=1), weights=change, minlength=int(label.max()) + 1)


@lru_cache(maxsize=None)
def _flip_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For flipping the centre of a 3x3x3 window: its 8 cells' corners as flat window indices (8,8), the
    centre's corner number in each cell (8,), and each case's chi change from flipping corner c (256,8)."""
    origins = CORNERS  # the cells' origins in the window, the centre (1,1,1) is corner 1 - origin of each
    corners = ((origins[:, None, :] + CORNERS[None]) * [9, 3, 1]).sum(axis=2)
    centre = np.array([int(np.flatnonzero((CORNERS == 1 - o).all(axis=1))[0]) for o in origins])
    table = _chi_table()
    case = np.arange(256)[:, None]
    change = table[case ^ (1 << np.arange(8))[None]] - table[case]
    return corners, centre, change


def _flip_chi(inside: np.ndarray, point: tuple[int, int, int]) -> float:
    """Euler characteristic change of flipping one lattice point off the lattice's faces (its 8 cells)."""
    corners, centre, change = _flip_tables()
    i, j, k = point
    window = inside[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].reshape(-1)
    case = (window[corners].astype(np.int64) << np.arange(8)).sum(axis=1)
    return float(change[case, centre].sum())


def _plug(inside: np.ndarray, points: np.ndarray, priority: np.ndarray, target: float, limit: int
          ) -> list[tuple[int, int, int]] | None:
    """The smallest set of `points` (a cluster, C order) whose flip raises the Euler characteristic by
    `target`, grown breadth-first through the cluster from each of its PLUG_SEEDS points of least priority
    (|SDF|: the narrowest part); flipped in `inside`. None (nothing flipped) if no seed does it within `limit`
    points."""
    best: list[tuple[int, int, int]] | None = None
    seeds = np.argsort(priority, kind="stable")[:PLUG_SEEDS]
    depths = ls.hops(points, inside.shape, seeds)
    for depth in depths:
        order = _grow_order(depth, priority, limit)
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


def _through_sheet(inside: np.ndarray, plug: np.ndarray, value: np.ndarray) -> bool:
    """Whether a cut plug (points (P,3), air now in `inside`) opened a passage through a sheet thicker than
    MAX_SHEET_MM: before the cut, the air beside its points lay in two or more pieces (6-connected) within
    SHEET_MARGIN voxels of it, and its deepest point lay more than MAX_SHEET_MM / 2 inside (`value`, NaN where
    only the sign is known: deep). A cut through a bridge has air around it in one piece."""
    depth = np.abs(value[tuple(plug.T)])
    if np.where(np.isnan(depth), np.inf, depth).max() * 2e3 <= MAX_SHEET_MM:
        return False
    lo = np.maximum(plug.min(axis=0) - SHEET_MARGIN, 0)
    hi = np.minimum(plug.max(axis=0) + SHEET_MARGIN + 1, inside.shape)
    air = ~inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    local = plug - lo
    air[tuple(local.T)] = False  # the plug's points as they were: solid
    label = ndimage.label(air, _CROSS)[0]
    beside = (local[:, None, :] + _STEPS[None]).reshape(-1, 3)
    beside = beside[((beside >= 0) & (beside < hi - lo)).all(axis=1)]
    pieces = np.unique(label[tuple(beside.T)])
    return int((pieces > 0).sum()) >= 2


def _notch(inside: np.ndarray, plug: np.ndarray, value: np.ndarray) -> bool:
    """Whether a cut plug (points (P,3), air now in `inside`) is a notch deeper than MAX_NOTCH_MM / 2 (`value`,
    NaN where only the sign is known: deep): the solid beside its points (26-neighbours) within one voxel of it
    is one 6-connected piece. A cut through a bridge leaves the bridge's ends apart there; a notch carves a
    block out of a body (seed 2's mouth corner at 96: 19 points, 3.06 mm deep, a hole into the mouth)."""
    depth = np.abs(value[tuple(plug.T)])
    if np.where(np.isnan(depth), np.inf, depth).max() * 2e3 <= MAX_NOTCH_MM:
        return False
    lo = np.maximum(plug.min(axis=0) - 1, 0)
    hi = np.minimum(plug.max(axis=0) + 2, inside.shape)
    solid = inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    label = ndimage.label(solid, _CROSS)[0]
    beside = (plug[:, None, :] - lo + _OFFSETS[None]).reshape(-1, 3)
    beside = beside[((beside >= 0) & (beside < hi - lo)).all(axis=1)]
    return int((np.unique(label[tuple(beside.T)]) > 0).sum()) <= 1


def _beside_parted(inside: np.ndarray, plug: np.ndarray, parted: Parted) -> bool:
    """Whether `parted` holds for the solid beside a cut plug (points (P,3), air now in `inside`; their
    26-neighbours): the surface opener slits the mesh there (where the lips touch, the solid above and below a
    cut), so the cut is left to it."""
    beside = np.unique((plug[:, None, :] + _OFFSETS[None]).reshape(-1, 3), axis=0)
    beside = beside[((beside >= 0) & (beside < inside.shape)).all(axis=1)]
    beside = beside[inside[tuple(beside.T)]]
    return len(beside) >= 2 and parted(beside)


def _refused_cut(inside: np.ndarray, plug: list[tuple[int, int, int]], value: np.ndarray,
                 stats: RepairStats, parted: Parted | None = None) -> bool:
    """Whether a cut plug (already made in `inside`) goes through a sheet, carves a notch or is where the
    surface opener parts the solid (`parted`, tested last: it solves the expressions); if so it is undone and
    counted in `stats`."""
    points = np.array(plug)
    if _through_sheet(inside, points, value):
        stats.plugs_through_sheet += 1
    elif _notch(inside, points, value):
        stats.plugs_notch += 1
    elif parted is not None and _beside_parted(inside, points, parted):
        stats.plugs_parted += 1
    else:
        return False
    _toggle(inside, plug)
    return True


def _grow_order(depth: np.ndarray, priority: np.ndarray, limit: int) -> np.ndarray:
    """Indices of a cluster's points in breadth-first order (depth: 26-neighbour hops from a seed), each layer
    in order of priority; the layers up to the one that reaches `limit` points."""
    counts = np.bincount(depth)
    last = int(np.searchsorted(np.cumsum(counts), limit))  # the layer that reaches the limit (or past the end)
    keep = np.flatnonzero(depth <= last)
    return keep[np.lexsort((priority[keep], depth[keep]))]


def _toggle(inside: np.ndarray, points: list[tuple[int, int, int]]) -> None:
    for p in points:
        inside[p] ^= True


def repair_radii(voxel: float) -> list[int]:
    """The closing/opening radii (voxels) tried on a lattice `voxel` metres apart; none on a coarse one."""
    return [r for r in range(1, MAX_RADIUS + 1) if r * voxel * 1e3 <= MAX_REACH_MM]


def repair_handles(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int, int], voxel: float,
                   evaluate: Evaluate, parted: Parted | None = None) -> tuple[np.ndarray, np.ndarray, RepairStats]:
    """The sign-changing cells (M,3) and corner values (M,8) of an extraction (lattice of `shape` points,
    `voxel` metres apart) with small handles removed (module docstring); `evaluate` gives the SDF at lattice
    points whose value the sparse extraction only certified; no cut is made whose solid beside it `parted` says
    the surface opener parts (None: the mesh is not opened)."""
    stats = RepairStats()
    radii = repair_radii(voxel)
    if not radii:
        return cells, values, stats
    inside, value = dense_signs(cells, values, shape)
    packed = ls.pack(inside)
    limit = max(1, int(MAX_PLUG_MM2 * 1e-6 / voxel**2))
    flipped: set[tuple[int, int, int]] = set()  # net flips
    for radius in radii:
        for fill in (True, False):
            points = ls.candidates(packed, shape, radius, fill)
            label = ls.clusters(points, shape)
            if len(points) == 0:
                continue
            change = _cluster_chi(inside, points, label)
            plugs = []
            for cluster in np.flatnonzero(change > 0):
                members = points[label == cluster]
                magnitude = np.abs(value[tuple(members.T)])
                priority = np.where(np.isnan(magnitude), np.inf, magnitude)
                plug = _plug(inside, members, priority, change[cluster], limit)
                if plug is None:
                    stats.plugs_too_large += 1
                elif fill or not _refused_cut(inside, plug, value, stats, parted):
                    plugs.append((plug, change[cluster]))
            # a fill must not enclose a pocket of air, a cut not split off a piece of solid
            for plug, rise in plugs:
                if ls.splits(inside, np.array(plug), solid=not fill):
                    _toggle(inside, plug)
                    continue
                ls.toggle_packed(packed, np.array(plug))
                flipped.symmetric_difference_update(plug)
                stats.handles_removed += int(round(rise / 2))
    if not flipped:
        return cells, values, stats
    net = np.array(sorted(flipped))
    now = inside[tuple(net.T)]
    stats.points_filled = int(now.sum())
    stats.points_cut = int((~now).sum())
    return (*_remarch(cells, values, inside, value, net, evaluate, stats), stats)


def _remarch(cells: np.ndarray, values: np.ndarray, inside: np.ndarray, value: np.ndarray, flipped: np.ndarray,
             evaluate: Evaluate, stats: RepairStats) -> tuple[np.ndarray, np.ndarray]:
    """The cells touching a flipped point (N,3) replaced by the sign-changing ones of the new signs, with
    values."""
    shape = inside.shape
    touched = ls.touching_cells(flipped, shape)
    cell_shape = tuple(s - 1 for s in shape)
    keep = ~np.isin(ls.flat(cells.astype(np.int64), cell_shape), ls.flat(touched, cell_shape))
    case = ls.cases(inside, touched)
    new = touched[(case > 0) & (case < 255)]
    corners = (new[:, None, :] + CORNERS[None]).reshape(-1, 3)
    unknown = np.unique(corners[np.isnan(value[tuple(corners.T)])], axis=0)
    if len(unknown):
        value[tuple(unknown.T)] = evaluate(unknown)
        stats.points_evaluated = len(unknown)
    v = np.abs(value[tuple(corners.T)]).reshape(-1, 8).astype(np.float32)
    v = np.maximum(v, MIN_VALUE)
    v = np.where(inside[tuple(corners.T)].reshape(-1, 8), -v, v)  # the lattice's (new) signs
    return (np.concatenate([cells[keep], new.astype(cells.dtype)]),
            np.concatenate([values[keep], v.astype(values.dtype)]))
