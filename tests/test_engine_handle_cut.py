"""Handles cut along a short non-separating loop and capped on the mesh (engine/handle_cut.py)."""

import numpy as np
from skimage.measure import marching_cubes

from backend.engine import handle_cut, mesh_cut
from backend.engine import surface_metrics as sm

H = 0.0015  # m: lattice spacing of the test shapes (a head at 128 cells has about 3 mm)


def _mc(field: np.ndarray, origin: float) -> dict[str, np.ndarray]:
    v, f, _, _ = marching_cubes(field, 0.0, spacing=(H, H, H))
    v = (v + origin).astype(np.float32)
    f = f[:, ::-1].astype(np.int32)  # outward for a field negative inside
    return {"vertices": v, "canonical": v.copy(), "faces": f, mesh_cut.NEW: np.zeros(len(v), bool)}


def _torus_field(p: np.ndarray, centre: tuple[float, float, float], big: float, small: float) -> np.ndarray:
    q = p - np.asarray(centre)
    return np.hypot(np.linalg.norm(q[..., :2], axis=-1) - big, q[..., 2]) - small


def _lattice(half: float) -> tuple[np.ndarray, float]:
    t = np.arange(-half, half + H / 2, H) + 0.37 * H  # no lattice point on the surface (no pinched vertices)
    return np.stack(np.meshgrid(t, t, t, indexing="ij"), -1), float(t[0])


def torus(big: float = 0.02, small: float = 0.004) -> dict[str, np.ndarray]:
    p, origin = _lattice(big + small + 3 * H)
    return _mc(_torus_field(p, (0, 0, 0), big, small), origin)


def _oriented(faces: np.ndarray) -> bool:
    """Every edge of two faces is used once in each direction (consistent winding)."""
    f = np.asarray(faces, np.int64)
    a, b = f.ravel(), f[:, [1, 2, 0]].ravel()
    n = int(f.max()) + 1
    directed = np.unique(a * n + b, return_counts=True)
    return bool((directed[1] == 1).all())


def _kept(before: np.ndarray, after: np.ndarray) -> int:
    """How many of `before`'s vertices are in `after` bitwise."""
    rows = lambda x: np.ascontiguousarray(x).view([("", x.dtype)] * 3).ravel()  # noqa: E731
    return int(np.isin(rows(before), rows(after)).sum())


def test_a_thin_handle_is_cut_along_its_waist_and_capped():
    t = torus()
    assert sm.topology(t["faces"]).genus == 1
    out, stats = handle_cut.cut_handles(t)
    topo = sm.topology(out["faces"])
    assert (topo.genus, topo.boundary_loops, len(topo.pieces), topo.nonmanifold_edges) == (0, 0, 1, 0)
    assert _oriented(out["faces"])
    assert stats.handles_cut == 1 and stats.handles_left == 0
    # the waist (2 pi 4 mm = 25 mm), not the way around the hole (2 pi 16 mm = 100 mm)
    assert 22 < stats.loops_mm[0] < 35
    # every vertex off the loop stays where it was; the loop's copies and the two caps' centres are new
    new = int(out[mesh_cut.NEW].sum())
    assert _kept(t["canonical"], out["canonical"]) == len(t["canonical"]) - (new - 2) // 2
    assert len(out["canonical"]) == len(t["canonical"]) + (new - 2) // 2 + 2
    for key in ("vertices", "canonical"):
        assert len(out[key]) == len(out[mesh_cut.NEW])


def test_two_handles_are_both_cut_and_a_surface_without_one_is_left_alone():
    p, origin = _lattice(0.05)
    two = _mc(np.minimum(_torus_field(p, (-0.022, 0, 0), 0.02, 0.004),
                         _torus_field(p, (0.022, 0, 0), 0.02, 0.004)), origin)
    assert sm.topology(two["faces"]).genus == 2
    out, stats = handle_cut.cut_handles(two)
    assert sm.topology(out["faces"]).genus == 0 and len(sm.topology(out["faces"]).pieces) == 1
    assert stats.handles_cut == 2 and all(20 < mm < 40 for mm in stats.loops_mm)
    again, none = handle_cut.cut_handles(out)
    assert again is out and none.handles_cut == 0 and none.handles_left == 0


def test_the_cube_search_looks_only_where_a_homology_basis_runs():
    """_basis_vertices marks a homology basis of each piece (the greedy system's loops from one root, with their
    paths to it); the cube search restricted to cubes holding one of its vertices finds the same handle pieces as
    the search over every cube, on one, two and no handles, and a ball (genus 0) has no basis at all."""
    p, origin = _lattice(0.05)
    two = _mc(np.minimum(_torus_field(p, (-0.022, 0, 0), 0.02, 0.004),
                         _torus_field(p, (0.022, 0, 0), 0.02, 0.004)), origin)
    ball = _mc(np.linalg.norm(p, axis=-1) - 0.03, origin)
    for mesh, handles in ((torus(), 1), (two, 2), (ball, 0)):
        pos, faces = mesh["canonical"].astype(np.float64), np.asarray(mesh["faces"], np.int64)
        basis = handle_cut._basis_vertices(pos, faces)
        assert basis is not None and (basis.any() == (handles > 0)) and basis.mean() < 0.5
        for stride in handle_cut.CUBE_STRIDES_MM:
            every = handle_cut._cube_pieces(pos, faces, stride * 1e-3)
            some = handle_cut._cube_pieces(pos, faces, stride * 1e-3, basis)
            assert sorted(map(tuple, map(sorted, every))) == sorted(map(tuple, map(sorted, some)))
        found = handle_cut._cube_pieces(pos, faces, handle_cut.CUBE_STRIDES_MM[-1] * 1e-3, basis)
        assert (len(found) > 0) == (handles > 0)


def test_a_fat_handle_is_not_cut():
    t = torus(0.03, 0.011)  # waist 2 pi 11 mm = 69 mm, inner equator 2 pi 19 mm: both > MAX_LOOP_MM
    out, stats = handle_cut.cut_handles(t)
    assert out is t and stats.handles_cut == 0 and stats.handles_left == 1


def test_the_loop_keeps_off_the_surface_boundary():
    t = torus()
    centre = t["canonical"][t["faces"]].mean(1)
    # a hole in the tube's outer side: the surface has a boundary loop there
    keep = np.linalg.norm(centre - [0.024, 0, 0], axis=1) > 0.003
    holed = mesh_cut.compact(dict(t, faces=t["faces"][keep]))
    before = sm.topology(holed["faces"])
    assert (before.genus, before.boundary_loops) == (1, 1)
    edges, count = sm.unique_edges(holed["faces"])
    rim = holed["canonical"][np.unique(edges[count == 1])]
    out, stats = handle_cut.cut_handles(holed)
    after = sm.topology(out["faces"])
    assert (after.genus, after.boundary_loops, stats.handles_cut) == (0, 1, 1)
    edges, count = sm.unique_edges(out["faces"])
    assert _kept(rim, out["canonical"][np.unique(edges[count == 1])]) == len(rim)  # the same rim, untouched


def folded_plates(n: int = 21, h: float = 0.004, d: float = 0.002) -> dict[str, np.ndarray]:
    """Two plates of n x n points h apart (z = +d and -d) joined along their last column (a fold, like lips at a
    mouth corner) and through the ring of their centre cell's 4 corners (z = 0, shared by both: a handle whose
    waist is that ring, as marching cubes makes round a lattice point where lips touch), the upper plate's cell
    diagonally beside one ring corner left out (a hole, like a slit's rim, touching the ring at that corner)."""
    c = n // 2
    ring = {(c, c): 0, (c + 1, c): 1, (c + 1, c + 1): 2, (c, c + 1): 3}
    pos = [(float(i), float(j), 0.0) for i, j in ring]
    ids: dict[tuple[int, int, int], int] = {}

    def vid(side: int, i: int, j: int) -> int:
        if (i, j) in ring:
            return ring[(i, j)]
        key = (1 if i == n - 1 else side, i, j)  # the fold: the last column is one
        if key not in ids:
            ids[key] = len(pos)
            pos.append((float(i), float(j), key[0] * d / h))
        return ids[key]

    faces = []
    for side in (1, -1):
        for i in range(n - 1):
            for j in range(n - 1):
                if (i, j) == (c, c) or (side == 1 and (i, j) == (c - 1, c - 1)):
                    continue
                a, b, e, f = vid(side, i, j), vid(side, i + 1, j), vid(side, i + 1, j + 1), vid(side, i, j + 1)
                faces += [(a, b, e), (a, e, f)] if side == 1 else [(a, e, b), (a, f, e)]
    p = (np.array(pos) * h).astype(np.float32)
    return {"vertices": p, "canonical": p.copy(), "faces": np.array(faces, np.int32),
            mesh_cut.NEW: np.zeros(len(p), bool)}


def test_a_handle_whose_waist_touches_the_boundary_is_cut_round_it():
    """Seed 1's lips with piece 12's weights: the handle's short loops all pass through a vertex of the slit's rim,
    which a cut may not use; the loop goes round that vertex through its faces away from the boundary."""
    m = folded_plates()
    before = sm.topology(m["faces"])
    assert (before.genus, before.boundary_loops, before.nonmanifold_edges) == (1, 2, 0) and _oriented(m["faces"])
    edges, count = sm.unique_edges(m["faces"])
    assert 0 in edges[count == 1]  # the ring corner is on the hole's rim
    out, stats = handle_cut.cut_handles(m)
    after = sm.topology(out["faces"])
    assert (after.genus, after.boundary_loops, len(after.pieces), stats.handles_cut) == (0, 2, 1, 1)
    assert _oriented(out["faces"])
    assert 16 < stats.loops_mm[0] < 40  # round the ring (16 mm) and the corner's faces, not the fold (> 80 mm)
    rim = m["canonical"][np.unique(edges[count == 1])]
    edges, count = sm.unique_edges(out["faces"])
    assert _kept(rim, out["canonical"][np.unique(edges[count == 1])]) == len(rim)


def banded_ring() -> dict[str, np.ndarray]:
    """A flat ring one square wide (every vertex on its boundary) whose hole and outer rim a band of two
    triangles joins: genus 1 with one boundary loop, and no loop off the boundary (a slit's rim bridged)."""
    grid = np.array([(i, j) for j in range(4) for i in range(4)], float)
    pos = np.c_[grid * 0.002, np.zeros(16)]

    def at(i: int, j: int) -> int:
        return j * 4 + i

    faces = []
    for j in range(3):
        for i in range(3):
            if (i, j) != (1, 1):
                a, b, c, d = at(i, j), at(i + 1, j), at(i + 1, j + 1), at(i, j + 1)
                faces += [(a, b, c), (a, c, d)]
    # the band's quad runs along the hole's edge (1,1)->(2,1) and the rim's (1,3)->(2,3) against the ring's
    # own winding there, so the surface stays oriented
    faces += [(at(1, 1), at(2, 1), at(1, 3)), (at(1, 1), at(1, 3), at(2, 3))]
    return {"canonical": pos, "faces": np.array(faces, np.int64)}


def test_a_bridge_across_the_boundary_is_opened_along_one_edge():
    mesh = banded_ring()
    assert _oriented(mesh["faces"])
    before = sm.topology(mesh["faces"])
    assert before.genus == 1 and before.boundary_loops == 1
    out, stats = handle_cut.cut_handles(mesh)
    after = sm.topology(out["faces"])
    assert (stats.handles_cut, stats.arcs_cut, stats.handles_left) == (0, 1, 0)
    assert after.genus == 0 and len(after.pieces) == 1 and after.boundary_loops == 2
    assert _oriented(out["faces"]) and len(out["faces"]) == len(mesh["faces"])
    assert len(out["canonical"]) == 18  # the opened edge's two ends got a copy per side


def test_no_edge_is_opened_where_opening_would_cut_a_piece_off():
    mesh = banded_ring()
    mesh["faces"] = mesh["faces"][:-2]  # the plain ring: genus 0, and every inner edge's cut separates it
    out, stats = handle_cut.cut_handles(mesh)
    assert stats.arcs_cut == 0 and len(out["faces"]) == 16
    assert handle_cut._cut_arc(mesh, 1.0, "canonical") is None
