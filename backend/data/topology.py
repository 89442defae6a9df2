"""Mesh topology in numpy: triangulation of polygons, boundary loops, ear-clipping caps, manifold checks,
edges and connected components. Used by the converter, the atlas and the tests."""

from __future__ import annotations

import numpy as np


def triangulate(polygons: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Fan-triangulate convex polygons (ICT quads are convex). Returns (triangles (F,3), corner index (F,3))
    where corner index (p, k) identifies the polygon corner each triangle corner came from, so per-corner
    attributes (UVs) follow the same split."""
    tris: list[tuple[int, int, int]] = []
    corners: list[tuple[int, int, int]] = []
    start = 0
    for poly in polygons:
        for k in range(1, len(poly) - 1):
            tris.append((poly[0], poly[k], poly[k + 1]))
            corners.append((start, start + k, start + k + 1))
        start += len(poly)
    return np.asarray(tris, np.int64).reshape(-1, 3), np.asarray(corners, np.int64).reshape(-1, 3)


def directed_edges(faces: np.ndarray) -> np.ndarray:
    return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def edge_counts(faces: np.ndarray) -> dict[str, int]:
    """Counts that decide whether a triangle mesh is a closed, consistently oriented 2-manifold."""
    d = directed_edges(faces)
    und = np.sort(d, axis=1)
    _, per_edge = np.unique(und, axis=0, return_counts=True)
    _, per_directed = np.unique(d, axis=0, return_counts=True)
    return {
        "edges": int(len(per_edge)),
        "boundary_edges": int((per_edge == 1).sum()),
        "nonmanifold_edges": int((per_edge > 2).sum()),
        "repeated_directed_edges": int((per_directed > 1).sum()),
    }


def is_watertight(faces: np.ndarray) -> bool:
    """Every edge shared by exactly two triangles with opposite directions (closed and oriented)."""
    c = edge_counts(faces)
    return c["boundary_edges"] == 0 and c["nonmanifold_edges"] == 0 and c["repeated_directed_edges"] == 0


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Boundary loops of an oriented manifold mesh, each ordered along the boundary edges' direction."""
    d = directed_edges(faces)
    present = {(int(a), int(b)) for a, b in d}
    succ: dict[int, int] = {}
    for a, b in present:
        if (b, a) not in present:
            if a in succ:
                raise ValueError(f"vertex {a} has two outgoing boundary edges (non-manifold boundary)")
            succ[a] = b
    loops = []
    while succ:
        start = next(iter(succ))
        loop = [start]
        nxt = succ.pop(start)
        while nxt != start:
            loop.append(nxt)
            nxt = succ.pop(nxt)
        loops.append(np.asarray(loop, np.int64))
    return loops


def cap_loop(vertices: np.ndarray, loop: np.ndarray) -> np.ndarray:
    """Ear-clip a boundary loop (ordered as boundary_loops returns it) in its best-fit plane. The caps'
    triangles run opposite to the boundary edges, so cap + mesh stays consistently oriented. No new vertices."""
    pts = vertices[loop].astype(np.float64)
    centre = pts.mean(0)
    _, _, vt = np.linalg.svd(pts - centre)
    q = (pts - centre) @ vt[:2].T
    # the cap traverses the loop reversed; its orientation in the plane decides which turns are convex
    order = list(range(len(loop)))[::-1]
    area = 0.5 * sum(q[order[i - 1], 0] * q[order[i], 1] - q[order[i], 0] * q[order[i - 1], 1]
                     for i in range(len(order)))
    sign = 1.0 if area > 0 else -1.0

    def cross(a: int, b: int, c: int) -> float:
        return float((q[b, 0] - q[a, 0]) * (q[c, 1] - q[a, 1]) - (q[b, 1] - q[a, 1]) * (q[c, 0] - q[a, 0]))

    def inside(p: int, a: int, b: int, c: int) -> bool:
        return sign * cross(a, b, p) >= 0 and sign * cross(b, c, p) >= 0 and sign * cross(c, a, p) >= 0

    tris: list[tuple[int, ...]] = []
    while len(order) > 3:
        for i in range(len(order)):
            a, b, c = order[i - 1], order[i], order[(i + 1) % len(order)]
            if sign * cross(a, b, c) <= 0:
                continue
            if any(inside(p, a, b, c) for p in order if p not in (a, b, c)):
                continue
            tris.append((a, b, c))
            order.pop(i)
            break
        else:
            raise ValueError("ear clipping failed: the boundary loop is not simple in its best-fit plane")
    tris.append(tuple(order))
    return loop[np.asarray(tris, np.int64)]


def edges(faces: np.ndarray) -> np.ndarray:
    """Unique undirected edges (E,2), a < b."""
    return np.unique(np.sort(directed_edges(faces), axis=1), axis=0)


def connected_components(n_vertices: int, edge_list: np.ndarray) -> np.ndarray:
    """Component label per vertex (union-find with path halving)."""
    parent = np.arange(n_vertices)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edge_list:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n_vertices)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)
