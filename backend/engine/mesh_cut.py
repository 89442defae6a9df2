"""Cutting a triangle mesh with per-vertex attribute arrays (numpy only): along a plane (keeping one side) and
along the zero set of a scalar field where it crosses chosen edges (a slit: the two sides get their own
vertices). Attributes of new vertices are interpolated along the cut edge; integer ones come from the nearer
end. Faces keep their winding."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .surface_metrics import edge_keys, unique_edges, vertex_components

NEW = "_new"  # optional per-vertex bool array: True for every vertex a cut adds
POSITIONS = ("vertices", "canonical")  # per-vertex arrays that are positions (a slit pulls their copies apart)
SNAP = 0.15  # a plane crossing nearer an edge end than this fraction of the edge moves that end onto the plane


def per_vertex(arrays: dict[str, np.ndarray], n: int) -> list[str]:
    return [k for k, a in arrays.items() if k != "faces" and getattr(a, "shape", (None,))[0] == n]


def _append(arrays: dict[str, np.ndarray], keys: list[str], a: np.ndarray, b: np.ndarray, s: np.ndarray,
            copy_keys: tuple[str, ...] = ()) -> None:
    """Add vertices at a + s (b - a) for each (a, b, s); keys in copy_keys take a's value instead."""
    for k in keys:
        arr = arrays[k]
        if k == NEW:
            arrays[k] = np.concatenate([arr, np.ones(len(a), bool)])
            continue
        if k in copy_keys or not np.issubdtype(arr.dtype, np.floating):
            near = np.where(s <= 0.5, a, b) if k not in copy_keys else a
            new = arr[near]
        else:
            w = s.reshape(-1, *([1] * (arr.ndim - 1))).astype(np.float64)
            new = (arr[a] * (1 - w) + arr[b] * w).astype(arr.dtype)
            if k == "normals":
                new = (new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)).astype(arr.dtype)
        arrays[k] = np.concatenate([arr, new])


def _edge_ids(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique edges (E,2) and each face's edge ids (F,3): edge j of a face joins corners j and j+1."""
    faces = np.asarray(faces, np.int64)
    n = int(faces.max()) + 1 if faces.size else 1
    keys, inverse = np.unique(edge_keys(faces, np.roll(faces, -1, axis=1), n).ravel(), return_inverse=True)
    return np.stack([keys // n, keys % n], axis=1), inverse.reshape(-1, 3)


def cut_plane(arrays: dict[str, np.ndarray], point: np.ndarray, normal: np.ndarray,
              key: str = "canonical") -> dict[str, np.ndarray]:
    """Keep the part of the mesh on the side of the plane (point, normal) that the normal points to, cut exactly
    along the plane: faces crossing it are split, so the new boundary lies in the plane. Vertex positions
    arrays[key] decide the side; vertices within SNAP of an edge's length from the plane are moved onto it
    first (no sliver triangles along the cut)."""
    out = dict(arrays)
    faces = np.asarray(arrays["faces"], np.int64)
    n = len(arrays[key])
    keys = per_vertex(arrays, n)
    normal = np.asarray(normal, np.float64) / np.linalg.norm(normal)
    d = (arrays[key].astype(np.float64) - point) @ normal
    edges, _ = _edge_ids(faces)
    length = np.linalg.norm(arrays[key][edges[:, 0]] - arrays[key][edges[:, 1]], axis=1)
    reach = np.zeros(n)
    np.maximum.at(reach, edges[:, 0], length)
    np.maximum.at(reach, edges[:, 1], length)
    snap = np.abs(d) < SNAP * reach
    for k in POSITIONS:
        if k in out:
            pos = out[k].astype(np.float64)
            pos[snap] -= d[snap, None] * normal
            out[k] = pos.astype(arrays[k].dtype)
    if NEW in out:  # moved: their attributes are no longer theirs
        out[NEW] = out[NEW] | snap
    d = np.where(snap, 0.0, d)
    side = np.sign(d)  # +1 kept, -1 dropped, 0 on the plane
    fs = side[faces]
    keep = (fs >= 0).all(1) & (fs > 0).any(1)
    split = (fs > 0).any(1) & (fs < 0).any(1)
    # crossing vertices, one per crossing edge
    cross = (side[edges[:, 0]] * side[edges[:, 1]]) < 0
    ce = edges[cross]
    s = d[ce[:, 0]] / (d[ce[:, 0]] - d[ce[:, 1]])
    new_id = np.full(len(edges), -1, np.int64)
    new_id[cross] = n + np.arange(cross.sum())
    _append(out, keys, ce[:, 0], ce[:, 1], s)
    lookup = {(int(a), int(b)): int(i) for (a, b), i in zip(ce, new_id[cross])}
    new_faces = [faces[keep]]
    for f in faces[split]:
        poly = []
        for j in range(3):
            a, b = int(f[j]), int(f[(j + 1) % 3])
            if side[a] >= 0:
                poly.append(a)
            if side[a] * side[b] < 0:
                poly.append(lookup[(min(a, b), max(a, b))])
        new_faces.append(np.array([[poly[0], poly[i], poly[i + 1]] for i in range(1, len(poly) - 1)], np.int64))
    out["faces"] = np.concatenate(new_faces).astype(arrays["faces"].dtype)
    return compact(out)


def slit(arrays: dict[str, np.ndarray], phi: np.ndarray, is_bridge: Callable[[np.ndarray], np.ndarray],
         pull: float = 0.25, close: int = 2, key: str = "canonical",
         split_at: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
         ) -> tuple[dict[str, np.ndarray], int]:
    """Open the mesh along phi = 0 where that crosses a bridge edge: `is_bridge(edges (E,2)) -> (E,) bool`
    picks, among edges whose ends have opposite signs of phi, those to open. Faces with a bridge edge are split
    along phi = 0 (their other crossing edges too, and the neighbours' faces on those edges); each bridge
    edge's crossing becomes two vertices, one per side, pulled `pull` of the way toward their own end (so
    the two sides also differ in position) and taking that end's non-position attributes. Other crossings
    stay single vertices: the slit closes there. Gaps of up to `close` crossing edges between bridges along the
    zero line are opened too (one slit, not a chain of slits pinched together). Returns the new arrays and the
    number of opened edges. `split_at(edges (K,2)) -> (t_first, t_second)`, if given, places each bridge
    edge's two copies at those fractions of the way from edges[:, 0] to edges[:, 1] instead (t_first <= t_second)."""
    faces = np.asarray(arrays["faces"], np.int64)
    n = len(arrays[key])
    keys = per_vertex(arrays, n)
    phi = np.where(phi == 0, 1e-12, phi).astype(np.float64)
    edges, fe = _edge_ids(faces)
    crossing = np.sign(phi[edges[:, 0]]) != np.sign(phi[edges[:, 1]])
    bridge = np.zeros(len(edges), bool)
    bridge[crossing] = is_bridge(edges[crossing])
    bridge = _close_gaps(bridge, crossing, fe, close)
    if not bridge.any():
        return arrays, 0
    zone = bridge[fe].any(1)
    cut = np.zeros(len(edges), bool)
    cut[fe[zone].ravel()] = True
    cut &= crossing
    out = dict(arrays)
    with np.errstate(divide="ignore", invalid="ignore"):  # only crossing edges (phi differs) use s
        s = phi[edges[:, 0]] / (phi[edges[:, 0]] - phi[edges[:, 1]])
    # single crossing vertices (slit ends), then the two copies of each bridge crossing
    single = cut & ~bridge
    first = np.full(len(edges), -1, np.int64)  # vertex on edges[:, 0]'s side
    second = np.full(len(edges), -1, np.int64)  # vertex on edges[:, 1]'s side
    idx = np.flatnonzero(single)
    first[idx] = second[idx] = n + np.arange(len(idx))
    _append(out, keys, edges[idx, 0], edges[idx, 1], s[idx])
    idx = np.flatnonzero(bridge)
    base = n + int(single.sum())
    first[idx] = base + np.arange(len(idx))
    second[idx] = base + len(idx) + np.arange(len(idx))
    a, b, t = edges[idx, 0], edges[idx, 1], s[idx]
    t_first, t_second = (t * (1 - pull), 1 - (1 - t) * (1 - pull)) if split_at is None else split_at(edges[idx])
    rest = tuple(k for k in keys if k not in POSITIONS)
    _append(out, keys, a, b, t_first, copy_keys=rest)
    _append(out, keys, b, a, 1 - t_second, copy_keys=rest)
    # a copy at its end is that end (the unused new vertex goes in compact)
    first[idx] = np.where(t_first <= 0, a, first[idx])
    second[idx] = np.where(t_second >= 1, b, second[idx])
    sign = np.sign(phi)
    touched = cut[fe].any(1)
    new_faces = [faces[~touched]]
    for f, ids in zip(faces[touched], fe[touched]):
        if (crossing[ids] & ~cut[ids]).any():  # outside the zone, one cut edge: two triangles, not along phi
            j = int(np.flatnonzero(cut[ids])[0])
            v, w, u, c = int(f[j]), int(f[(j + 1) % 3]), int(f[(j + 2) % 3]), int(first[ids[j]])
            new_faces.append(np.array([[v, c, u], [c, w, u]], np.int64))
            continue
        # walk the triangle's corners, inserting each cut edge's crossing; pieces are runs of one sign
        ring: list[tuple[int, float, int]] = []  # (vertex, sign it belongs to (0: both), the other copy)
        for j in range(3):
            v, w, e = int(f[j]), int(f[(j + 1) % 3]), int(ids[j])
            ring.append((v, sign[v], -1))
            if cut[e]:
                ends = edges[e]
                on_v = first[e] if ends[0] == v else second[e]
                on_w = second[e] if ends[0] == v else first[e]
                ring.append((on_v, sign[v], on_w) if on_v != on_w else (on_v, 0.0, -1))
                if on_v != on_w:
                    ring.append((on_w, sign[w], on_v))
        new_faces.append(_split_ring(ring))
    out["faces"] = np.concatenate(new_faces).astype(arrays["faces"].dtype)
    return compact(out), int(bridge.sum())


def _close_gaps(bridge: np.ndarray, crossing: np.ndarray, fe: np.ndarray, steps: int) -> np.ndarray:
    """Morphological closing of the bridge edges along the zero line: neighbours are the two crossing edges of a
    face. Dilate `steps` times, then erode as often (an end of the line counts as a bridge neighbour)."""
    pair_faces = crossing[fe].sum(1) == 2
    pairs = np.sort(fe[pair_faces][crossing[fe[pair_faces]]].reshape(-1, 2), axis=1)
    if not len(pairs) or steps <= 0:
        return bridge
    out = bridge.copy()
    for _ in range(steps):
        grow = out.copy()
        grow[pairs[out[pairs[:, 0]], 1]] = True
        grow[pairs[out[pairs[:, 1]], 0]] = True
        out = grow
    for _ in range(steps):
        lost = np.zeros_like(out)
        lost[pairs[~out[pairs[:, 0]], 1]] = True
        lost[pairs[~out[pairs[:, 1]], 0]] = True
        out = out & ~lost
    return out | bridge


def _split_ring(ring: list[tuple[int, float, int]]) -> np.ndarray:
    """Triangles of the polygon `ring` split into its positive and negative parts: each crossing point opens
    into its two copies (or stays one vertex), which bound the two sides; each part is fan-triangulated."""
    signs = [sg for _, sg, _ in ring if sg != 0]
    tris: list[list[int]] = []
    for want in (1.0, -1.0):
        if want not in signs:
            continue
        poly: list[int] = []
        for v, sg, _ in ring:
            if (sg == want or sg == 0) and (not poly or v != poly[-1]):  # a copy may be its end vertex itself
                poly.append(v)
        if len(poly) > 1 and poly[-1] == poly[0]:
            poly.pop()
        tris.extend([poly[0], poly[i], poly[i + 1]] for i in range(1, len(poly) - 1))
    return np.asarray(tris, np.int64).reshape(-1, 3)


def split_pinches(arrays: dict[str, np.ndarray], pull: float = 0.05, key: str = "canonical",
                  cut: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Give each fan of faces around a vertex its own copy of it where several fans meet at the vertex (a
    pinch: e.g. a slit passing on two sides of a vertex leaves two fans of it, each between two boundary
    edges; the surface is not a manifold there). Fans: the faces around the vertex joined through edges that
    two faces share; a vertex on an edge of more faces is left as it is. Each copy moves `pull` of the way
    toward the mean of its fan's other corners (the copies differ in position). `cut` (K,2): edges (vertex pairs)
    that do not join fans either (the mesh opens along them). Returns the arrays and the number of vertices
    split."""
    faces = np.asarray(arrays["faces"], np.int64)
    n = len(arrays[key])
    vertex = faces.ravel()  # corner 3 f + j: face f's slot j, whose edge (slot j's edge id) joins slots j, j + 1
    edges, fe = _edge_ids(faces)
    count = np.bincount(fe.ravel(), minlength=len(edges))
    joins = count == 2
    if cut is not None and len(cut):
        keys = edge_keys(edges[:, 0], edges[:, 1], n)
        joins &= ~np.isin(keys, edge_keys(cut[:, 0], cut[:, 1], n))
    occ = np.flatnonzero(joins[fe.ravel()])
    occ = occ[np.argsort(fe.ravel()[occ], kind="stable")]
    p, q = occ[0::2], occ[1::2]  # an edge's two faces' slots
    p1, q1 = _next_corner(p), _next_corner(q)
    straight = vertex[p] == vertex[q]
    joined = np.concatenate([np.where(straight, q, q1), np.where(straight, q1, q)])  # the same vertex's corners
    graph = coo_matrix((np.ones(2 * len(p), np.int8), (np.concatenate([p, p1]), joined)),
                       shape=(faces.size, faces.size))
    fan = connected_components(graph, directed=False)[1]
    fan_vertex = np.zeros(fan.max() + 1, np.int64)
    fan_vertex[fan] = vertex
    crowded = np.zeros(n, bool)
    crowded[edges[count > 2].ravel()] = True
    pinched_vertex = (np.bincount(fan_vertex, minlength=n) > 1) & ~crowded
    if not pinched_vertex.any():
        return arrays, 0
    ids = np.flatnonzero(pinched_vertex[fan_vertex])  # the fans that get a copy: every fan of those vertices
    new_id = np.full(len(fan_vertex), -1, np.int64)
    new_id[ids] = n + np.arange(len(ids))
    out = dict(arrays)
    _append(out, per_vertex(arrays, n), fan_vertex[ids], fan_vertex[ids], np.zeros(len(ids)))
    corner = np.flatnonzero(new_id[fan] >= 0)
    copy = new_id[fan[corner]] - n
    others = vertex[_next_corner(corner)], vertex[_next_corner(_next_corner(corner))]
    for k in POSITIONS:
        if k in out:
            pos = out[k].astype(np.float64)
            target = np.zeros((len(ids), 3))
            np.add.at(target, copy, pos[others[0]] + pos[others[1]])
            weight = np.bincount(copy, minlength=len(ids)) * 2.0
            pos[n:] += pull * (target / weight[:, None] - pos[n:])
            out[k] = pos.astype(arrays[k].dtype)
    if NEW in out:
        out[NEW][n:] = True
    flat = vertex.copy()
    flat[corner] = n + copy
    out["faces"] = flat.reshape(-1, 3).astype(arrays["faces"].dtype)
    return compact(out), int(pinched_vertex.sum())


def _next_corner(c: np.ndarray) -> np.ndarray:
    return c - c % 3 + (c + 1) % 3


def compact(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop vertices no face uses (and degenerate faces with a repeated corner)."""
    faces = np.asarray(arrays["faces"], np.int64)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])]
    n = len(arrays["canonical"])
    used = np.zeros(n, bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    out = {k: a[used] for k, a in arrays.items() if k in per_vertex(arrays, n)}
    out.update({k: a for k, a in arrays.items() if k not in out and k != "faces"})
    out["faces"] = remap[faces].astype(arrays["faces"].dtype)
    return out


def _pieces(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected pieces: each vertex's label, the vertices used by faces, and the pieces' vertex counts."""
    faces = np.asarray(arrays["faces"], np.int64)
    label = vertex_components(len(arrays["canonical"]), unique_edges(faces)[0])
    used = np.unique(faces)
    return label, used, np.bincount(label[used], minlength=int(label.max()) + 1)


def largest_piece_mask(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: the vertices of the connected piece with the most vertices."""
    label, _, sizes = _pieces(arrays)
    return label == int(np.argmax(sizes))


def keep_largest_piece(arrays: dict[str, np.ndarray], keep_from: np.ndarray | None = None,
                       min_size: int = 0) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """The connected piece with the most vertices, plus every piece of at least `min_size` vertices that has a
    vertex in `keep_from` (N,) bool (a part of the surface that a cut separated, not a floater); returns how
    many pieces were dropped and which of the input's vertices (N,) bool were."""
    label, used, sizes = _pieces(arrays)
    kept = np.arange(len(sizes)) == int(np.argmax(sizes))
    if keep_from is not None:
        marked = np.zeros(len(sizes), bool)
        marked[label[used][keep_from[used]]] = True
        kept |= marked & (sizes >= min_size)
    out = dict(arrays)
    out["faces"] = arrays["faces"][kept[label[np.asarray(arrays["faces"], np.int64)[:, 0]]]]
    lost = np.zeros(len(label), bool)
    lost[used] = ~kept[label[used]]
    return compact(out), int((sizes > 0).sum() - kept.sum()), lost


def boundary_cycles(faces: np.ndarray) -> list[np.ndarray]:
    """Simple boundary loops, each ordered against the winding of the faces along it (so a cap triangulating
    the loop in its order has the mesh's winding). Boundary vertices where several loops touch end no cycle:
    loops through them are left out."""
    faces = np.asarray(faces, np.int64)
    a, b = faces.ravel(), faces[:, [1, 2, 0]].ravel()
    n = int(faces.max()) + 1 if faces.size else 1
    keys = edge_keys(a, b, n)  # undirected: a boundary edge's key occurs once
    uniq, counts = np.unique(keys, return_counts=True)
    single = np.isin(keys, uniq[counts == 1])
    ra, rb = a[single], b[single]  # boundary edges as the faces run them (ra -> rb)
    out_deg = np.bincount(rb, minlength=n)  # walked backwards: rb -> ra, the cap's direction
    if len(ra) == 0:
        return []
    if (out_deg > 1).any():
        bad = np.flatnonzero(out_deg > 1)
        keep = ~np.isin(ra, bad) & ~np.isin(rb, bad)
        ra, rb = ra[keep], rb[keep]
    step = np.full(n, -1, np.int64)
    step[rb] = ra
    seen = np.zeros(n, bool)
    cycles = []
    for start in rb.tolist():
        if seen[start]:
            continue
        loop, cur = [start], int(step[start])
        seen[start] = True
        while cur >= 0 and not seen[cur]:
            seen[cur] = True
            loop.append(cur)
            cur = int(step[cur])
        if cur == start:
            cycles.append(np.asarray(loop, np.int64))
    return cycles


def min_area_triangulation(pos: np.ndarray) -> np.ndarray:
    """(T,3) indices into a closed 3D polygon pos (P,3) in its order: the triangulation with the least total
    area (dynamic programming over the polygon's diagonals, O(P^3)); it adds no vertex. Triangles follow the
    polygon's order (i < k < j)."""
    p = len(pos)
    pos = np.asarray(pos, np.float64)
    cost = np.zeros((p, p))
    best = np.zeros((p, p), np.int64)
    for gap in range(2, p):
        for i in range(p - gap):
            j = i + gap
            mid = np.arange(i + 1, j)
            area = 0.5 * np.linalg.norm(np.cross(pos[mid] - pos[i], pos[j] - pos[i]), axis=1)
            total = cost[i, mid] + cost[mid, j] + area
            m = int(np.argmin(total))
            cost[i, j], best[i, j] = total[m], mid[m]
    tris: list[tuple[int, int, int]] = []
    stack = [(0, p - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        k = int(best[i, j])
        tris.append((i, k, j))
        stack += [(i, k), (k, j)]
    return np.asarray(tris, np.int64).reshape(-1, 3)


def cap_loops(arrays: dict[str, np.ndarray], loops: list[np.ndarray], key: str = "canonical"
              ) -> dict[str, np.ndarray]:
    """Close each boundary cycle (as `boundary_cycles` orders them) with triangles between its own vertices."""
    if not loops:
        return arrays
    pos = np.asarray(arrays[key], np.float64)
    caps = [loop[min_area_triangulation(pos[loop])] for loop in loops]
    out = dict(arrays)
    out["faces"] = np.concatenate([np.asarray(arrays["faces"], np.int64), *caps]).astype(arrays["faces"].dtype)
    return out
