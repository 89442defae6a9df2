"""Clean, open head surfaces from the extracted canonical mesh (docs/surface.md).

The canonical head is the neutral one, whose lips touch and whose upper eyelids touch the eyeballs, so the
zero level set joins them: a mouth cannot open and a lid cannot slide without tearing faces. After the
vertex attributes (each vertex's template position: its closest point on the mean ICT head), `apply`:

1. neck: cuts exactly along a plane a fixed margin above the template's neck opening (the model's closed,
   rippled neck bottom goes; the new boundary is one planar loop);
2. upper eyelids: slits where an edge joins a vertex whose template point is on an upper lid to one on that
   eye's sclera (the scleras are separate closed surfaces of the template), through the edge's middle. The
   eyeball stays joined to the lower lid (no loose piece) and the upper lid can close over it;
3. lips (and lids, where the model moves them): slits where the expression that parts them (jawOpen,
   eyeBlink_L/R at weight 1, solved as the deform op solves it) moves an edge's two ends apart by more than
   its length: along the level of the motion halfway between the two sides' typical motion. The template's
   own lip line was tried first and does not work with the current correspondence head: near the contact it
   puts vertices that the warp moves with the upper lip on the lower lip (docs/surface.md);
4. pinches: where a slit passes on two sides of a vertex, its fans of faces get a copy each (a manifold);
5. pieces: keeps the largest connected piece (drops an inner mouth shell, floaters, slivers the slits cut
   off), and any piece of at least KEPT_PIECE of the vertices that was part of the head before the slits;
6. holes: a slit's loop with one side only, beside a piece of the head that step 5 dropped, is capped
   between its own vertices (_one_sided_loops).

A slit vertex becomes two, pulled slightly apart toward their own sides (mesh_cut.slit), and the deform op
follows the path from weight 0 (deform.solve_continued), so each side keeps to its own root of the warp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .. import errors
from ..data.atlas import Atlas
from . import deform, handle_cut, mesh_cut
from .surface_metrics import unique_edges

if TYPE_CHECKING:  # scipy.spatial is imported where the tree is built: it is most of a cold start's scipy time
    from scipy.spatial import cKDTree

NECK_MARGIN = 0.05  # m above the template's neck opening (its plane, along its normal)
KEPT_PIECE = 0.005  # a piece the slits cut off the head is kept from this fraction of the vertices up
HEAD_FACES_END = 28120  # atlas faces [0, 28120): head and neck cap; then the two scleras (backend/data/ict.py)
NECK_CAP_FACES = 52  # the last head faces: the ear-clipped 54-vertex neck loop
EYELID_PULL = 0.05  # the two sides of a lid slit: 0.1 of the edge apart (no motion has to tell them apart)
EYES = (("left upper eyelid", "left eyeball"), ("right upper eyelid", "right eyeball"))
MOUTH = ("upper lip", "lower lip", "mouth interior", "left mouth corner", "right mouth corner")
# (expression, zone regions, the two sides' regions): slit where that expression at weight 1 moves neighbours apart
MOTION_CUTS = (
    ("jawOpen", MOUTH, ("upper lip",), ("lower lip",)),
    *((f"eyeBlink_{s}", (f"{side} upper eyelid", f"{side} lower eyelid", f"{side} eyeball"), (f"{side} upper eyelid",),
       (f"{side} eyeball",)) for s, side in (("L", "left"), ("R", "right"))),
)
STRETCH_CUT = 2.5  # an edge the expression would stretch beyond this factor is a bridge
JUMP_SAMPLES = 16  # motion samples along a bridge edge (where its copies go: _motion_jump)
JUMP_MARGIN = 2  # samples between a copy and the motion's jump
JITTER, JITTER_TRIES = 2e-6, 2  # m, tries: where copies go, the motion must not change when points move this much
ROBUST_TOL = 0.1  # of the edge's length: the motion at a moved point counts as the same
COPY_STRETCH = 2.0  # a copy's edge to its own end stretches at most this much under the expression
SETTLE_STEP, SETTLE_TRIES = 0.25, 3  # a vertex with a non-robust root moves this much toward its neighbours' mean
# m: the jitters _settle tests a vertex's root with (one try each). Beside the slit the other lip's root can
# take over anywhere within ~0.3 mm of a vertex (docs/surface.md), which 2 um tries alone do not see.
SETTLE_JITTERS = (JITTER,) * 2 + (2e-5,) * 2 + (5e-5,) * 2
STRETCH_LIMIT = 3.0  # issue 13's limit: a settled vertex keeps most of its edges within it under the expression
SHORT_EDGE = 0.75  # of the median edge: where the slit ends, only edges this short are collapsed (_collapse_stretched)
# m: and edges this short at any resolution. The motion grows like the square root of the distance from the slit's
# end (a crack's tip), so an edge there stretches the more the shorter it is (seed 16 at 256: docs/surface.md)
SHORT_EDGE_M = 0.002
COLLAPSE_PASSES = 8  # most rounds of _collapse_stretched: until one collapses nothing (a kept end or an ear is left)
LEVEL_RINGS = 2  # edge rings around a vertex that set its own cut level (_local_level)
MIN_SEPARATION = 0.001  # m: sides whose median motions differ less are not cut (the expression does not part them)
# Vertices whose template point is within this of the MOTION_CUTS zones' template vertices follow the expression
# path in the deform op (deform.solve_continued's path_points; docs/surface.md measures the margin)
PATH_MARGIN = 0.005
SOURCE = "_source"  # int64 per vertex while the handles are cut: the vertex it was, or was copied from
SIDE = "_side"  # int8 per vertex: +-(index of the MOTION_CUTS entry + 1) by the sign of its phi, 0 outside its zones


Motion = Callable[[np.ndarray, str], np.ndarray]  # (canonical points (P,3), expression) -> displacement (P,3)


@dataclass
class OpenStats:
    neck_plane_point: list[float]
    neck_plane_normal: list[float]
    pieces_dropped: int
    eyelid_edges_opened: int  # by the template (upper lid - sclera)
    motion_edges_opened: int  # by the expressions' motion (lips under jawOpen, lids under eyeBlink)
    vertices_settled: int = 0  # vertices by a motion slit moved off a root that rounding can change (_settle)
    edges_collapsed: int = 0  # short edges by a motion slit that the expression stretched (_collapse_stretched)
    pinches_split: int = 0  # vertices where fans of faces met (a slit on two sides of them), one copy per fan
    handles_cut: int = 0  # handles the lattice repair left, cut along a short loop and capped (handle_cut)
    handle_loops_mm: list[float] = field(default_factory=list)  # those loops' lengths
    handle_arcs_cut: int = 0  # handles through a slit's rim, opened along an edge across it (handle_cut)
    holes_capped: int = 0  # slit loops with one side only (the other side's piece was dropped: _one_sided_loops)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class SurfaceOpener:
    """Built once per atlas; `apply` takes a head's mesh arrays (generate's: canonical, template, region, ...)
    and each vertex's closest template point (face, barycentric)."""

    def __init__(self, atlas: Atlas):
        self.atlas = atlas
        self.faces = np.asarray(atlas.faces, np.int64)
        names = list(atlas.names)
        self.eyes = [(names.index(lid), names.index(ball)) for lid, ball in EYES]

    @cached_property
    def neck_plane(self) -> tuple[np.ndarray, np.ndarray]:
        """(point, upward normal) of the cut: the template neck opening's best-fit plane, raised by NECK_MARGIN."""
        v = np.asarray(self.atlas.vertices, np.float64)
        pts = v[_neck_ring(self.faces[:HEAD_FACES_END])]
        centre = pts.mean(0)
        normal = np.linalg.svd(pts - centre)[2][2]
        if normal[1] < 0:
            normal = -normal
        return centre + NECK_MARGIN * normal, normal

    @cached_property
    def _path_tree(self) -> cKDTree:
        names = list(self.atlas.names)
        ids = sorted({names.index(r) for _, zone, _, _ in MOTION_CUTS for r in zone})
        from scipy.spatial import cKDTree

        return cKDTree(np.asarray(self.atlas.vertices, np.float64)[np.isin(self.atlas.region, ids)])

    def path_points(self, template: np.ndarray) -> np.ndarray:
        """(N,) bool: the vertices with template positions (N,3) that the deform op solves along the expression
        path (deform.solve_continued's path_points): within PATH_MARGIN of the template's vertices of the zones
        that MOTION_CUTS opens (lips, mouth, lids, eyeballs), where the backward warp has several roots."""
        if not len(template):
            return np.zeros(0, bool)
        dist, _ = self._path_tree.query(np.asarray(template, np.float64), distance_upper_bound=PATH_MARGIN)
        return np.isfinite(dist)

    def apply(self, arrays: dict[str, np.ndarray], closest_face: np.ndarray, closest_bary: np.ndarray,
              motion: Motion) -> tuple[dict[str, np.ndarray], OpenStats]:
        n = len(arrays["canonical"])
        if closest_face.shape != (n,) or closest_bary.shape != (n, 3):
            raise errors.BackendError("template correspondence does not match the mesh", code="internal_error")
        arrays = dict(arrays)
        arrays["_tface"] = np.asarray(closest_face, np.int64)
        arrays["_tbary"] = np.asarray(closest_bary, np.float64)
        point, normal = self.neck_plane
        arrays = mesh_cut.cut_plane(arrays, point, normal)
        arrays, lids = self._open_eyelids(arrays)
        # The head as one piece before the lips are slit: a slit that cuts a real part off (a fitted head lost its
        # mouth and chin so, docs/capture.md) must not delete it with the floaters.
        arrays["_head"] = mesh_cut.largest_piece_mask(arrays).astype(np.float32)
        arrays, moved, settled, pinches, collapsed = self._open_by_motion(arrays, motion)
        arrays, more = mesh_cut.split_pinches(arrays)
        pinches += more
        before, head = arrays, arrays["_head"] > 0.5
        arrays, dropped, lost = mesh_cut.keep_largest_piece(arrays, keep_from=head,
                                                            min_size=int(KEPT_PIECE * len(arrays["canonical"])))
        holes = _one_sided_loops(arrays, before["canonical"][lost & head])
        arrays = mesh_cut.cap_loops(arrays, holes)
        arrays[SOURCE] = np.arange(len(arrays["canonical"]))
        arrays, cuts = handle_cut.cut_handles(arrays)
        arrays, more = self._settle_handle_copies(arrays, motion)
        settled += more
        for k in ("_tface", "_tbary", "_head", SIDE, SOURCE):
            arrays.pop(k)
        return arrays, OpenStats([float(x) for x in point], [float(x) for x in normal], dropped, lids, moved,
                                 settled, collapsed, pinches, cuts.handles_cut, cuts.loops_mm, cuts.arcs_cut,
                                 len(holes))

    def _zone(self, arrays: dict[str, np.ndarray], regions: tuple[str, ...]) -> np.ndarray:
        """Vertices whose closest template triangle has a corner in one of the regions."""
        ids = [list(self.atlas.names).index(r) for r in regions]
        return np.isin(self.atlas.region[self.faces[arrays["_tface"]]], ids).any(1)

    def _open_by_motion(self, arrays: dict[str, np.ndarray], motion: Motion
                        ) -> tuple[dict[str, np.ndarray], int, int, int, int]:
        """For each MOTION_CUTS expression: its displacement |D| of the zone's vertices (and two rings around them)
        at weight 1, phi = |D| - tau with tau halfway between the medians of the two sides' vertices; a bridge
        is an edge of two of those vertices (the zone and two rings: the jump can run past the mouth regions at a
        corner) across phi = 0 whose ends move apart by more than (STRETCH_CUT - 1) x its
        length. The mesh is slit there (mesh_cut.slit), then vertices by the slit whose root is not robust are
        moved (_settle), and edges by the slit that it still stretches beyond STRETCH_LIMIT are collapsed
        (_collapse_stretched). Returns the arrays, the opened edges, the moved vertices, the pinches split and the
        collapsed edges."""
        opened = settled = pinches = collapsed = 0
        arrays[SIDE] = np.zeros(len(arrays["canonical"]), np.int8)
        for cut_id, (expression, zone_regions, side_a, side_b) in enumerate(MOTION_CUTS, start=1):
            zone = self._zone(arrays, zone_regions)
            if not zone.any():
                continue
            edges, _ = unique_edges(np.asarray(arrays["faces"], np.int64))
            near = zone.copy()
            for _ in range(2):
                near[edges[near[edges[:, 0]], 1]] = True
                near[edges[near[edges[:, 1]], 0]] = True
            canon = arrays["canonical"].astype(np.float64)
            disp = np.zeros_like(canon)
            disp[near] = motion(arrays["canonical"][near], expression)
            size = np.linalg.norm(disp, axis=1)
            a_side, b_side = zone & self._zone(arrays, side_a), zone & self._zone(arrays, side_b)
            if not a_side.any() or not b_side.any():
                continue
            med_a, med_b = float(np.median(size[a_side])), float(np.median(size[b_side]))
            if abs(med_a - med_b) < MIN_SEPARATION:
                continue
            phi = np.where(near, size - _local_level(size, edges, near, 0.5 * (med_a + med_b)), 1.0)
            untagged = near & (arrays[SIDE] == 0)  # a slit's copies take their own end's tag
            arrays[SIDE] = np.where(untagged, np.where(phi > 0, cut_id, -cut_id), arrays[SIDE]).astype(np.int8)

            def is_bridge(e: np.ndarray, zone=near, disp=disp) -> np.ndarray:
                a, b = e[:, 0], e[:, 1]
                apart = np.linalg.norm(disp[a] - disp[b], axis=1)
                return zone[a] & zone[b] & (apart > (STRETCH_CUT - 1) * np.linalg.norm(canon[a] - canon[b], axis=1))

            def split_at(e: np.ndarray, expression=expression) -> tuple[np.ndarray, np.ndarray]:
                return _motion_jump(canon[e[:, 0]], canon[e[:, 1]], lambda p: motion(p, expression))

            arrays, count = mesh_cut.slit(arrays, phi, is_bridge, split_at=split_at)
            opened += count
            if count:
                # pinches first: their copies are new positions, whose roots _settle checks too
                arrays, split = mesh_cut.split_pinches(arrays)
                pinches += split
                along = _along(motion, expression)
                zone_now = self._zone(arrays, zone_regions)
                arrays, moved, left = _settle(arrays, zone_now, along)
                if left.any():  # again, with their neighbours where the first pass moved them
                    arrays, again, _ = _settle(arrays, zone_now & left, along)
                    moved += again
                settled += moved
                arrays, count = _collapse_stretched(arrays, self._zone(arrays, zone_regions), along)
                collapsed += count
        return arrays, opened, settled, pinches, collapsed

    def _settle_handle_copies(self, arrays: dict[str, np.ndarray], motion: Motion) -> tuple[dict[str, np.ndarray], int]:
        """_settle the vertices the handle cuts made (copies of one source vertex, SOURCE) in the MOTION_CUTS
        zones, off the boundary too: a loop round a handle at the lips' contact need not run where the motion
        jumps, so a copy there can take the other lip's root (seed 5 at 128, run 2 piece 19: one upper-lip copy
        dropped 21 mm with the jaw, stretching its six edges up to 15x; docs/surface.md)."""
        source = arrays[SOURCE]
        copies = np.bincount(source, minlength=int(source.max()) + 1)[source] > 1
        moved = 0
        if not copies.any():
            return arrays, moved
        for expression, zone_regions, _, _ in MOTION_CUTS:
            zone = self._zone(arrays, zone_regions) & copies
            if zone.any():
                arrays, count, _ = _settle(arrays, zone, _along(motion, expression), anywhere=True)
                moved += count
        return arrays, moved

    def _open_eyelids(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Slit each upper lid from its eyeball where an edge joins a vertex on the template's upper lid to one on
        its sclera (a separate closed surface of the template), through the edge's middle."""
        opened = 0
        for lid, ball in self.eyes:
            region = self.atlas.region[self.faces[arrays["_tface"], np.argmax(arrays["_tbary"], 1)]]
            on_ball = (arrays["_tface"] >= HEAD_FACES_END) & (region == ball)
            on_lid = (arrays["_tface"] < HEAD_FACES_END) & (region == lid)
            phi = np.where(on_ball, -1.0, 1.0)

            def is_bridge(edges: np.ndarray, on_ball=on_ball, on_lid=on_lid) -> np.ndarray:
                a, b = edges[:, 0], edges[:, 1]
                return (on_ball[a] & on_lid[b]) | (on_lid[a] & on_ball[b])

            arrays, count = mesh_cut.slit(arrays, phi, is_bridge, pull=EYELID_PULL)
            opened += count
        return arrays, opened


def _along(motion: Motion, expression: str) -> Callable[[np.ndarray], np.ndarray]:
    """The motion's displacement under one expression, NaN rows where its root finding did not converge (the
    motion's `solved`, where it has one)."""
    solved = getattr(motion, "solved", motion)

    def along(points: np.ndarray) -> np.ndarray:
        return solved(points, expression)

    return along


def _one_sided_loops(arrays: dict[str, np.ndarray], lost: np.ndarray) -> list[np.ndarray]:
    """Boundary cycles (mesh_cut.boundary_cycles) left where a piece of the head was dropped: all their vertices
    lie on one side of one motion slit (SIDE) and within two of the loop's median edge lengths of the dropped
    vertices `lost` (P,3). Such a loop is a hole, not a slit: the piece on its other side (e.g. a strip of the
    lower lip's top that the warp moves with the upper lip, cut off by the jawOpen slit: docs/surface.md) is
    gone. A slit's loops stay open, also where a slit all around a band leaves each side its own loop.
    Capping a hole between its own vertices closes that side again with no vertex whose root could be the
    other side's."""
    if not len(lost):
        return []
    from scipy.spatial import cKDTree

    side, pos = arrays[SIDE], arrays["canonical"].astype(np.float64)
    tree = cKDTree(np.asarray(lost, np.float64))
    holes = []
    for loop in mesh_cut.boundary_cycles(arrays["faces"]):
        if side[loop[0]] == 0 or (side[loop] != side[loop[0]]).any():
            continue
        reach = 2.0 * float(np.median(np.linalg.norm(pos[loop] - pos[np.roll(loop, -1)], axis=1)))
        if np.isfinite(tree.query(pos[loop], distance_upper_bound=reach)[0]).all():
            holes.append(loop)
    return holes


def _robust(points: np.ndarray, motion: Callable[[np.ndarray], np.ndarray], tol: np.ndarray,
            jitters: tuple[float, ...] = (JITTER,) * JITTER_TRIES, also: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The motion at points (P,3) and whether it stays within tol (P,) when the points move by each of `jitters`
    (m, one try each): near the lips' contact the backward warp has nearly singular roots, and which one the root
    finder takes can change with its float rounding (the batch of points, the threads, the device). Third: the
    motion at the points `also` (Q,3), solved in the same call."""
    flat = np.asarray(points, np.float32)
    rng = np.random.default_rng(0)
    tries = [flat] + [flat + rng.normal(0.0, j, flat.shape).astype(np.float32) for j in jitters]
    extra = np.zeros((0, 3), np.float32) if also is None else np.asarray(also, np.float32)
    # One root-finding call for all tries: on a GPU its cost is the iteration count, not the points.
    out = motion(np.concatenate([*tries, extra]))
    d, *moved = np.split(out[:len(tries) * len(flat)], len(tries))
    robust = np.ones(len(flat), bool)
    for m in moved:
        robust &= np.linalg.norm(m - d, axis=1) <= tol
    return d, robust, out[len(tries) * len(flat):]


def _settle(arrays: dict[str, np.ndarray], zone: np.ndarray, motion: Callable[[np.ndarray], np.ndarray],
            anywhere: bool = False) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Move the zone's vertices on or next to the mesh boundary whose root is not robust (_robust with
    SETTLE_JITTERS; `motion` may give NaN rows where it has no root: not robust) or parts from most of their
    neighbours' (an edge to them would stretch beyond STRETCH_LIMIT: the other lip's root) a step toward their
    neighbours' mean (SETTLE_STEP of the way, up to SETTLE_TRIES times), away from the contact where the root is
    ambiguous, and keep the first position that is robust and follows the neighbours. A vertex that follows most
    of them but stretches an edge beyond STRETCH_LIMIT (on a small island of a third root: seed 2's mouth corner
    at 256, docs/surface.md) moves only to a position where none of its edges does. A vertex that is unsolved
    or does not follow them takes, failing that, the first position that follows (on the CPU the opener's roots
    are the deform op's: deform.MIN_ROWS); else the vertex stays. Their attributes are then recomputed
    (mesh_cut.NEW). With `anywhere`, every zone vertex is a candidate, on the boundary or not. Returns the arrays,
    how many vertices moved and which vertices (N,) bool are unsolved or do not follow their neighbours and found
    no position (a second pass, after their neighbours moved, may)."""
    faces = np.asarray(arrays["faces"], np.int64)
    edges, count = unique_edges(faces)
    n = len(arrays["canonical"])
    canon = arrays["canonical"].astype(np.float64)
    on_boundary = np.zeros(n, bool)
    on_boundary[edges[count == 1].ravel()] = True
    near = on_boundary.copy()
    near[edges[on_boundary[edges[:, 0]], 1]] = True
    near[edges[on_boundary[edges[:, 1]], 0]] = True
    cand = np.flatnonzero(zone if anywhere else near & zone)
    left = np.zeros(n, bool)
    if not len(cand):
        return arrays, 0, left
    degree = np.bincount(edges.ravel(), minlength=n).astype(np.float64)
    total = np.zeros((n, 3))
    reach = np.zeros(n)
    for a, b in ((edges[:, 0], edges[:, 1]), (edges[:, 1], edges[:, 0])):
        np.add.at(total, a, canon[b])
        np.add.at(reach, a, np.linalg.norm(canon[a] - canon[b], axis=1))
    mean = total / np.maximum(degree, 1)[:, None]
    tol = ROBUST_TOL * reach / np.maximum(degree, 1)
    # The motion of the candidates (tested) and of their other neighbours (once), then each candidate's edges
    is_cand = np.zeros(n, bool)
    is_cand[cand] = True
    ring = np.zeros(n, bool)
    ring[edges[is_cand[edges[:, 0]], 1]] = True
    ring[edges[is_cand[edges[:, 1]], 0]] = True
    ring &= ~is_cand
    others = np.flatnonzero(ring)
    d, ok0, disp_others = _robust(canon[cand], motion, tol[cand], SETTLE_JITTERS, also=canon[others])
    disp = np.zeros((n, 3))
    disp[cand] = d
    disp[others] = disp_others
    pairs = edges[is_cand[edges[:, 0]] | is_cand[edges[:, 1]]]
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    pairs = pairs[is_cand[pairs[:, 0]]]  # (candidate, neighbour)

    def follows(v: np.ndarray, pos: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether candidates v at positions pos moving dv keep at least half their edges within STRETCH_LIMIT,
        and whether they keep all of them (edges to unsolved neighbours do not count)."""
        slot = np.full(n, -1, np.int64)
        slot[v] = np.arange(len(v))  # v: distinct vertices
        p = pairs[slot[pairs[:, 0]] >= 0]
        i = slot[p[:, 0]]
        rest = np.linalg.norm(pos[i] - canon[p[:, 1]], axis=1)
        now = np.linalg.norm(pos[i] + dv[i] - canon[p[:, 1]] - disp[p[:, 1]], axis=1)
        known = np.isfinite(disp[p[:, 1]]).all(1)
        good = np.bincount(i, (now <= STRETCH_LIMIT * rest) & known, minlength=len(v))
        known_count = np.bincount(i, known, minlength=len(v))
        return good >= 0.5 * known_count, good >= known_count

    follows0, taut0 = follows(cand, canon[cand], d)  # False where unsolved too
    # on an island of another root: an edge stretches, and the vertex parts from its neighbours' mean motion by
    # more than such an edge's ends do (the neighbour at the other end of that edge stays)
    island = ok0 & follows0 & ~taut0 & _parts_from_neighbours(cand, disp, pairs, reach / np.maximum(degree, 1))
    bad = np.flatnonzero(~(ok0 & follows0) | island)
    steps = np.minimum(1.0, np.arange(1, SETTLE_TRIES + 1) * SETTLE_STEP)
    trials = canon[cand[bad]][None] + steps[:, None, None] * (mean[cand[bad]] - canon[cand[bad]])[None]
    ok = np.zeros((len(steps), len(bad)), bool)
    if len(bad):
        dt, okt, _ = _robust(trials.reshape(-1, 3), motion, np.tile(tol[cand[bad]], len(steps)), SETTLE_JITTERS)
        ok = okt.reshape(len(steps), len(bad))
        dt = dt.reshape(len(steps), len(bad), 3)
        misplaced = ~follows0[bad]  # unsolved or on the other side's root
        fits = [follows(cand[bad], trials[j], dt[j]) for j in range(len(steps))]
        with_root = np.stack([half for half, _ in fits])  # finite too
        # a vertex that follows but stretches an edge (an island of another root) moves only where none stretches
        with_root &= np.stack([whole for _, whole in fits]) | ~island[bad][None]
        # robust positions first; a misplaced vertex, failing those, takes the first one that follows
        ok = np.concatenate([ok & with_root, with_root & misplaced[None]])
        trials = np.concatenate([trials, trials])
    first = np.argmax(ok, axis=0)
    good = ok[first, np.arange(len(bad))]
    fix = np.zeros(len(cand), bool)
    fix[bad[good]] = True
    trials_of = np.zeros((len(cand), 3))
    trials_of[bad[good]] = trials[first[good], np.flatnonzero(good)]
    pos = canon.copy()
    pos[cand[fix]] = trials_of[fix]
    moved = np.zeros(n, bool)
    moved[cand[fix]] = True
    left[cand[bad[~good & ~follows0[bad]]]] = True  # unsolved or on the other side's root, still
    if not moved.any():
        return arrays, 0, left
    out = dict(arrays)
    for key in mesh_cut.POSITIONS:
        if key in out:
            out[key] = pos.astype(arrays[key].dtype)
    if mesh_cut.NEW in out:  # moved: their attributes are no longer theirs
        out[mesh_cut.NEW] = out[mesh_cut.NEW] | moved
    return out, int(moved.sum()), left


def _parts_from_neighbours(cand: np.ndarray, disp: np.ndarray, pairs: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Whether each candidate's motion (disp rows: NaN unsolved) differs from the mean of its solved neighbours'
    (pairs: (candidate, neighbour) rows) by more than (STRETCH_LIMIT - 1) x its mean edge length `edge`."""
    slot = np.full(len(disp), -1, np.int64)
    slot[cand] = np.arange(len(cand))
    i, d = slot[pairs[:, 0]], disp[pairs[:, 1]]
    known = np.isfinite(d).all(1)
    total = np.zeros((len(cand), 3))
    np.add.at(total, i[known], d[known])
    mean = total / np.maximum(np.bincount(i[known], minlength=len(cand)), 1)[:, None]
    return np.linalg.norm(disp[cand] - mean, axis=1) > (STRETCH_LIMIT - 1) * edge[cand]


def _collapse_stretched(arrays: dict[str, np.ndarray], zone: np.ndarray,
                        motion: Callable[[np.ndarray], np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Remove the edges within two rings of the zone and of the mesh boundary that the motion (NaN rows: unsolved)
    stretches beyond STRETCH_LIMIT by collapsing one of their ends onto a neighbour (the other end or another).
    Where the slit ends, both lips' motions meet in a steep but continuous ramp, and marching cubes leaves edges
    there far shorter than the ramp is wide: such an edge stretches by the ramp's slope, a longer one by less.
    A collapse is made where the collapsed edge is shorter than SHORT_EDGE x the mesh's median edge or than
    SHORT_EDGE_M (or drops an ear, a rim vertex with one face, of any size: that face straddles the motion's jump,
    as a bridge does), the kept vertex (which does not move: its root and attributes stay) gets no new edge beyond
    STRETCH_LIMIT, the mesh stays a manifold of the same topology and no face turns over (_collapse_cost); the
    collapse whose new edges stretch least is taken. Rounds over disjoint neighbourhoods until one collapses
    nothing (at most COLLAPSE_PASSES). Returns the arrays and the number of edges collapsed."""
    faces = np.asarray(arrays["faces"], np.int64)
    edges, count = unique_edges(faces)
    n = len(arrays["canonical"])
    canon = arrays["canonical"].astype(np.float64)
    median = float(np.median(np.linalg.norm(canon[edges[:, 0]] - canon[edges[:, 1]], axis=1)))
    short = max(SHORT_EDGE * median, SHORT_EDGE_M)
    on_boundary = np.zeros(n, bool)
    on_boundary[edges[count == 1].ravel()] = True
    # a crack tip's ramp reaches two rings in from the rim, and the slit two rings past the zone (_open_by_motion)
    cand = _grow(_grow(on_boundary, edges), edges) & _grow(_grow(zone, edges), edges)
    if not cand.any():
        return arrays, 0
    reach = _grow(_grow(cand, edges), edges)  # the candidates' neighbours may be kept, and gain their edges
    disp = np.full((n, 3), np.nan)
    disp[reach] = motion(canon[reach])
    posed = canon + disp
    total = 0
    for _ in range(COLLAPSE_PASSES):
        edges, count = unique_edges(faces)
        on_boundary[:] = False
        on_boundary[edges[count == 1].ravel()] = True
        a, b = edges[:, 0], edges[:, 1]
        with np.errstate(invalid="ignore"):
            stretch = np.linalg.norm(posed[a] - posed[b], axis=1) / np.linalg.norm(canon[a] - canon[b], axis=1)
        todo = np.flatnonzero(cand[a] & cand[b] & (stretch > STRETCH_LIMIT))
        if not len(todo):
            break
        order = np.argsort(faces.ravel(), kind="stable")
        starts = np.searchsorted(faces.ravel()[order], np.arange(n + 1))

        def faces_of(v: int, order=order, starts=starts) -> np.ndarray:
            return order[starts[v]:starts[v + 1]] // 3

        locked = np.zeros(n, bool)
        alive = np.ones(len(faces), bool)
        done = 0
        for e in todo[np.argsort(-stretch[todo])]:
            u, w = int(a[e]), int(b[e])
            if locked[u] or locked[w]:
                continue
            best: tuple[float, int, int] | None = None
            for drop in (u, w):
                for keep in np.unique(faces[faces_of(drop)]).tolist():
                    if keep == drop or locked[keep]:
                        continue
                    worst = _collapse_cost(faces, faces_of, keep, drop, on_boundary, canon, posed, short)
                    if worst is not None and worst <= STRETCH_LIMIT and (best is None or worst < best[0]):
                        best = (worst, keep, drop)
            if best is None:
                continue
            _, keep, drop = best
            f_keep, f_drop = faces_of(keep), faces_of(drop)
            alive[f_drop[(faces[f_drop] == keep).any(1)]] = False
            locked[np.unique(faces[np.concatenate([f_keep, f_drop])])] = True
            faces[f_drop] = np.where(faces[f_drop] == drop, keep, faces[f_drop])
            done += 1
        faces = faces[alive]
        total += done
        if not done:
            break
    if not total:
        return arrays, 0
    out = dict(arrays)
    out["faces"] = faces.astype(arrays["faces"].dtype)
    return mesh_cut.compact(out), total


def _collapse_cost(faces: np.ndarray, faces_of: Callable[[int], np.ndarray], keep: int, drop: int,
                   on_boundary: np.ndarray, canon: np.ndarray, posed: np.ndarray, short: float) -> float | None:
    """The largest stretch of the edges that collapsing `drop` onto `keep` gives `keep` (0 if none), or None where
    the collapse is not made: its edge is not shorter than `short` (the surface would move too far; an ear, drop
    with one face, goes at any length: nothing moves and no edge is added), it would change the topology (the
    link condition: the two ends share only the third corners of the faces on their edge; an inner edge of two
    boundary vertices would pinch the surface, unless all of drop's faces go and every corner they leave keeps at
    most two boundary edges), leave no face, turn a face over (its canonical normal against the old one) or join
    an unsolved vertex."""
    f_keep, f_drop = faces_of(keep), faces_of(drop)
    on_edge = (faces[f_drop] == keep).any(1)
    shared, moved = f_drop[on_edge], f_drop[~on_edge]
    if not 0 < len(shared) <= 2 or len(shared) == len(f_drop) == len(f_keep):
        return None
    ear = len(f_drop) == 1
    if ear and not _stays_manifold(faces, faces_of, shared, drop):
        return None
    if np.linalg.norm(canon[keep] - canon[drop]) >= short and not ear:
        return None
    if len(shared) == 2 and on_boundary[keep] and on_boundary[drop]:
        if len(moved) or not _stays_manifold(faces, faces_of, shared, drop):
            return None
    n_keep = set(faces[f_keep].ravel().tolist()) - {keep, drop}
    n_drop = set(faces[f_drop].ravel().tolist()) - {keep, drop}
    if len(moved) and n_keep & n_drop != set(faces[shared].ravel().tolist()) - {keep, drop}:
        return None
    old = faces[moved]
    new = np.where(old == drop, keep, old)

    def normals(f: np.ndarray) -> np.ndarray:
        return np.cross(canon[f[:, 1]] - canon[f[:, 0]], canon[f[:, 2]] - canon[f[:, 0]])

    if ((normals(old) * normals(new)).sum(1) <= 0).any():
        return None
    others = np.asarray(sorted(n_drop - n_keep), np.int64)
    if not len(others):
        return 0.0
    now = np.linalg.norm(posed[others] - posed[keep], axis=1)
    if not np.isfinite(now).all():
        return None
    return float((now / np.linalg.norm(canon[others] - canon[keep], axis=1)).max())


def _stays_manifold(faces: np.ndarray, faces_of: Callable[[int], np.ndarray], gone: np.ndarray, drop: int) -> bool:
    """Whether every corner of the faces `gone` but `drop` keeps at most two boundary edges without them (one fan
    of faces: no pinch) or no face at all."""
    for v in set(faces[gone].ravel().tolist()) - {drop}:
        left = np.setdiff1d(faces_of(v), gone)
        if not len(left):
            continue
        f = faces[left]
        edges, count = unique_edges(f)
        if int(((count == 1) & (edges == v).any(1)).sum()) > 2:
            return False
    return True


def _grow(mask: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """mask and its vertices' neighbours over the edges."""
    out = mask.copy()
    out[edges[mask[edges[:, 0]], 1]] = True
    out[edges[mask[edges[:, 1]], 0]] = True
    return out


def _local_level(size: np.ndarray, edges: np.ndarray, near: np.ndarray, level: float) -> np.ndarray:
    """The level that separates the two sides of a jump of `size`, per vertex: halfway between the largest and
    smallest size within LEVEL_RINGS edge rings where they differ by more than MIN_SEPARATION (a jump nearby),
    else `level` (the whole zone's). Near the mouth corners both lips move less or more than the mouth's middle
    does, so one level for the whole zone does not cross the jump there and the slit would stop short."""
    hi, lo = np.where(near, size, -np.inf), np.where(near, size, np.inf)
    for _ in range(LEVEL_RINGS):
        hi2, lo2 = hi.copy(), lo.copy()
        for a, b in ((edges[:, 0], edges[:, 1]), (edges[:, 1], edges[:, 0])):
            np.maximum.at(hi2, a, hi[b])
            np.minimum.at(lo2, a, lo[b])
        hi, lo = hi2, lo2
    jump = near & (hi - lo > MIN_SEPARATION)
    return np.where(jump, 0.5 * (np.where(jump, hi, 0.0) + np.where(jump, lo, 0.0)), level)


def _motion_jump(a: np.ndarray, b: np.ndarray, motion: Callable[[np.ndarray], np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Where the slit's two copies go on segments a -> b (K,3), as fractions (t_a, t_b) of the way: the motion at
    JUMP_SAMPLES + 1 evenly spaced points, each point on the side of the end whose motion is nearer its own.
    A copy goes to the sample farthest from its own end that is still on its end's side, at least JUMP_MARGIN
    samples short of the other side, and whose motion follows its end's within COPY_STRETCH (the edge from the end
    to the copy stretches at most that much); none such: the copy is the end itself. Close to the jump the
    warp's roots are nearly singular and which one the root finder takes depends on its float rounding (the
    deform op poses other batches of points than this does); the motion can also jump more than once."""
    t = np.linspace(0.0, 1.0, JUMP_SAMPLES + 1)
    pts = a[:, None] + t[None, :, None] * (b - a)[:, None]
    tol = np.repeat(ROBUST_TOL * np.linalg.norm(b - a, axis=1), len(t))
    d, robust, _ = _robust(pts.reshape(-1, 3), motion, tol)
    d, robust = d.reshape(len(a), len(t), 3), robust.reshape(len(a), len(t))
    near_a = np.linalg.norm(d - d[:, :1], axis=2) < np.linalg.norm(d - d[:, -1:], axis=2)
    run_a = np.argmin(near_a, axis=1) - 1  # last index of the run from a (near_a[:, 0] is always true)
    run_b = len(t) - np.argmax(near_a[:, ::-1], axis=1)  # first index of the run ending at b
    length = np.linalg.norm(b - a, axis=1)[:, None]
    idx = np.arange(len(t))[None, :]
    # a copy at sample i: the edge from its end (length s L) stretches by at most 1 + |d_i - d_end| / (s L)
    follows_a = np.linalg.norm(d - d[:, :1], axis=2) <= (COPY_STRETCH - 1) * t[None, :] * length
    follows_b = np.linalg.norm(d - d[:, -1:], axis=2) <= (COPY_STRETCH - 1) * (1 - t[None, :]) * length
    ok_a = follows_a & robust & (idx <= (run_a - JUMP_MARGIN)[:, None])
    ok_b = follows_b & robust & (idx >= (run_b + JUMP_MARGIN)[:, None])
    i_a = np.where(ok_a, idx, 0).max(1)
    i_b = np.where(ok_b, idx, len(t) - 1).min(1)
    return t[i_a], t[i_b]


class ExpressionMotion:
    """Motion for a session's head: the deform op's root finding (deform.solve_continued with its finer paths for
    points the path leaves unconverged, deform.REFINE_PATH: the slits and the settle must see the roots the deform
    op will find, docs/surface.md 2026-12-07) at weight 1; where it does not converge, its best iterate (as the
    deform op returns it). `solved` gives NaN rows there instead (_settle moves such vertices: the deform op would
    report them unsolved). A point solved before for the same expression is not solved again (_Roots)."""

    def __init__(self, session, z_id: torch.Tensor):
        self.session, self.z_id = session, z_id
        self._roots: dict[str, _Roots] = {}

    def _solve(self, points: np.ndarray, expression: str) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(points, np.float32)
        roots = self._roots.setdefault(expression, _Roots())
        keys = _point_keys(p)
        at = roots.find(keys)
        new = at < 0
        if new.any():
            roots.add(keys[new], *self._solve_new(p[new], expression))
            at = roots.find(keys)
        return roots.disp[at], roots.converged[at]

    def _solve_new(self, points: np.ndarray, expression: str) -> tuple[np.ndarray, np.ndarray]:
        session, names = self.session, self.session.expression_names
        e = torch.zeros((1, len(names)), device=session.device)
        e[0, names.index(expression)] = 1.0
        x_c = torch.as_tensor(points, device=session.device, dtype=torch.float32)
        res = deform.solve_continued(lambda t: session.warp_fn(self.z_id, e * t), x_c, 1,
                                     deform.continuation_steps(e), refine=deform.REFINE_PATH)
        return (res.vertices[0] - x_c).cpu().numpy().astype(np.float64), res.converged[0].cpu().numpy()

    def __call__(self, points: np.ndarray, expression: str) -> np.ndarray:
        return self._solve(points, expression)[0]

    def solved(self, points: np.ndarray, expression: str) -> np.ndarray:
        d, converged = self._solve(points, expression)
        d[~converged] = np.nan
        return d


class _Roots:
    """The displacements and convergence of the points an expression was solved at, by the float32 point (sorted
    _point_keys). A point's root does not depend on the other points of its solve (deform.MIN_ROWS), so a point
    asked for again (the collapse's vertices, the settle's neighbours: solved with the zone) takes it from here:
    on a GPU each solve costs its iterations' launches, whatever its points."""

    def __init__(self) -> None:
        self.keys = _point_keys(np.zeros((0, 3), np.float32))
        self.disp = np.zeros((0, 3))
        self.converged = np.zeros(0, bool)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's row (-1: not solved yet)."""
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    def add(self, keys: np.ndarray, disp: np.ndarray, converged: np.ndarray) -> None:
        keys, first = np.unique(keys, return_index=True)  # a point given twice: one root
        keys = np.concatenate([self.keys, keys])
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.disp = np.concatenate([self.disp, disp[first]])[order]
        self.converged = np.concatenate([self.converged, converged[first]])[order]


def _point_keys(points: np.ndarray) -> np.ndarray:
    """(P,) keys that are equal where the float32 points (P,3) are (their bytes), sortable."""
    return np.ascontiguousarray(points, np.float32).view(np.dtype((np.void, 12))).ravel()


def parted(motion: Motion, points: np.ndarray) -> bool:
    """Whether an expression that the opener slits by (MOTION_CUTS) moves two of the points (P,3) apart by more
    than (STRETCH_CUT - 1) x their distance, as it does a bridge edge's ends (`motion` NaN where unsolved: such a
    point parts nothing). The lattice repair makes no cut there (handle_repair.Parted): where the lips touch, the
    slit opens them along the motion's jump, and a cut beside it moves the slit off one lip's rim."""
    rest = np.linalg.norm(points[:, None] - points[None], axis=2)
    for expression, *_ in MOTION_CUTS:
        d = motion(points, expression)
        if (np.linalg.norm(d[:, None] - d[None], axis=2) > (STRETCH_CUT - 1) * rest).any():
            return True
    return False


def expression_motion(session, z_id: torch.Tensor) -> Motion:
    """ExpressionMotion of a session's head."""
    return ExpressionMotion(session, z_id)


def open_head(session, arrays: dict[str, np.ndarray], z_id: torch.Tensor, zr: torch.Tensor, k: torch.Tensor
              ) -> tuple[dict[str, np.ndarray], dict]:
    """A session's head mesh arrays (Session.attributes') opened (SurfaceOpener.apply); the vertices the cuts add
    get their attributes (normals, template, region, UV) from the network at their own positions, as every
    other vertex does."""
    face, bary, _ = session.template_index.closest(arrays["template"])
    arrays = dict(arrays)
    arrays[mesh_cut.NEW] = np.zeros(len(arrays["canonical"]), bool)
    opened, stats = session.surface_opener.apply(arrays, face, bary, expression_motion(session, z_id))
    new = opened.pop(mesh_cut.NEW)
    if new.any():
        from .extract import Mesh

        fresh, _ = session.attributes(Mesh(opened["canonical"][new], np.zeros((0, 3), np.int32)), zr, k)
        for key in ("normals", "template", "region", "uv"):
            opened[key][new] = fresh[key]
    return opened, stats.to_dict() | {"vertices_added": int(new.sum())}


def _neck_ring(head: np.ndarray) -> np.ndarray:
    """Vertices of the template's neck opening: the converter ear-clips that 54-vertex loop into the last
    NECK_CAP_FACES head faces (backend/data/ict.py); checked: without them the head's only boundary is that loop."""
    cap = head[-NECK_CAP_FACES:]
    ring = np.unique(cap)
    edges, count = unique_edges(head[:-NECK_CAP_FACES])
    if not np.array_equal(np.unique(edges[count == 1]), ring):
        raise errors.BackendError("the atlas's neck cap is not where the converter puts it", code="internal_error")
    return ring
