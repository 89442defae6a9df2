"""Topology and quality measurements of a head mesh (numpy only): pieces, genus, boundary loops, the neck
cut's planarity and smoothness, and how far an expression stretches edges. Used by `python -m backend
surface` and the tests; nothing here changes a mesh."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def edge_keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 key per undirected edge (a, b) of vertices below n: min * n + max (sorting the keys sorts the
    (min, max) pairs row by row; much faster than np.unique(axis=0) on rows)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return np.minimum(a, b) * n + np.maximum(a, b)


def unique_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges (E,2) (sorted pairs, in row order) and how many faces use each (E,)."""
    faces = np.asarray(faces)
    f = faces.astype(np.int64, copy=False)
    n = int(f.max()) + 1 if f.size else 1
    keys, counts = np.unique(edge_keys(f.ravel(), f[:, [1, 2, 0]].ravel(), n), return_counts=True)
    return np.stack([keys // n, keys % n], axis=1).astype(faces.dtype, copy=False), counts


def vertex_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected component label (n,) of each vertex over the given edges (isolated vertices: own labels)."""
    if len(edges) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclass
class Topology:
    vertices: int  # vertices used by faces, all pieces
    pieces: list[int]  # vertex count of each connected piece, largest first
    euler: int  # V - E + F of the largest piece
    boundary_loops: int  # of the largest piece
    genus: float  # of the largest piece: (2 - euler - boundary_loops) / 2 (a half: not a manifold)
    nonmanifold_edges: int  # edges of more than two faces, all pieces

    @property
    def second_piece_fraction(self) -> float:
        return self.pieces[1] / self.vertices if len(self.pieces) > 1 else 0.0


def topology(faces: np.ndarray) -> Topology:
    faces = np.asarray(faces, np.int64)
    if len(faces) == 0:
        return Topology(0, [], 0, 0, 0.0, 0)
    used = np.unique(faces)
    remap = np.full(int(faces.max()) + 1, -1, np.int64)
    remap[used] = np.arange(len(used))
    f = remap[faces]
    edges, count = unique_edges(f)
    label = vertex_components(len(used), edges)
    sizes = np.bincount(label)
    main = int(np.argmax(sizes))
    face_main = label[f[:, 0]] == main
    edge_main = label[edges[:, 0]] == main
    boundary = edges[edge_main & (count == 1)]
    loops = 0
    if len(boundary):
        blabel = vertex_components(len(used), boundary)
        loops = len(np.unique(blabel[boundary[:, 0]]))
    euler = int(sizes[main] - edge_main.sum() + face_main.sum())
    return Topology(vertices=len(used), pieces=sorted(sizes.tolist(), reverse=True), euler=euler,
                    boundary_loops=loops, genus=(2 - euler - loops) / 2, nonmanifold_edges=int((count > 2).sum()))


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Boundary loops as vertex index arrays in order (boundary vertices with more than two boundary edges,
    where loops touch, end a loop early; they are rare and only shorten what is measured)."""
    edges, count = unique_edges(np.asarray(faces, np.int64))
    b = edges[count == 1]
    nbrs: dict[int, list[int]] = {}
    for a, c in b.tolist():
        nbrs.setdefault(a, []).append(c)
        nbrs.setdefault(c, []).append(a)
    seen: set[int] = set()
    loops = []
    for start in nbrs:
        if start in seen:
            continue
        loop, prev, cur = [start], -1, start
        seen.add(start)
        while True:
            nxt = [v for v in nbrs[cur] if v != prev and v not in seen]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
            seen.add(cur)
            loop.append(cur)
        loops.append(np.asarray(loop, np.int64))
    return loops


@dataclass
class LoopShape:
    vertices: int
    length_m: float
    planarity_m: float  # largest distance of a loop vertex from the loop's best-fit plane
    smoothness: float  # loop length / perimeter of its convex hull in that plane (1: convex, saw teeth: > 1)
    normal: np.ndarray  # best-fit plane normal (3,)


def loop_shape(points: np.ndarray) -> LoopShape:
    """Planarity and smoothness of a closed loop of points (N,3), N >= 3."""
    from scipy.spatial import ConvexHull

    p = np.asarray(points, np.float64)
    centre = p.mean(0)
    _, _, vt = np.linalg.svd(p - centre)
    planarity = float(np.abs((p - centre) @ vt[2]).max())
    length = float(np.linalg.norm(p - np.roll(p, 1, 0), axis=1).sum())
    q = (p - centre) @ vt[:2].T
    hull = ConvexHull(q)
    return LoopShape(len(p), length, planarity, length / float(hull.area), vt[2])  # 2-D hull "area" = perimeter


def neck_loop(vertices: np.ndarray, faces: np.ndarray) -> LoopShape | None:
    """The boundary loop lowest in y (the neck cut) with its shape, or None for a closed mesh."""
    loops = [loop for loop in boundary_loops(faces) if len(loop) >= 3]
    if not loops:
        return None
    lowest = min(loops, key=lambda loop: float(vertices[loop, 1].mean()))
    return loop_shape(vertices[lowest])


def edge_stretch(canonical: np.ndarray, posed: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Posed length / canonical length of every mesh edge (E,)."""
    edges, _ = unique_edges(np.asarray(faces, np.int64))
    rest = np.linalg.norm(canonical[edges[:, 0]] - canonical[edges[:, 1]], axis=1)
    now = np.linalg.norm(posed[edges[:, 0]] - posed[edges[:, 1]], axis=1)
    return now / np.maximum(rest, 1e-12)
