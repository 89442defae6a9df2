"""Queries against the mean template head (the atlas): closest surface point, region label, ICT UVs.

UVs: a point's UV is the barycentric interpolation of the per-corner UVs of the template triangle holding
its closest point. Seams: a per-vertex UV can hold only one chart, so a vertex takes the chart of its
closest template triangle; a generated triangle whose corners land in different UV islands of the template
straddles a seam and gets stretched UVs. Such faces are counted (`seam_faces`) so callers can see them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import errors
from ..cpu import thread_map
from .components import edge_labels

if TYPE_CHECKING:
    from ..data.atlas import Atlas


def closest_point_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                               coord_dim: int = -1) -> torch.Tensor:
    """Barycentric coordinates (..., 3) of the point of triangle (a, b, c) closest to p (Ericson, Real-Time
    Collision Detection 5.1.5), vectorised over the other axes. The x, y, z coordinates lie along `coord_dim`
    (the last axis by default; 0 keeps every product and sum on contiguous coordinate planes, which is several
    times faster on CPU with the same sums in the same order)."""
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    k = coord_dim
    d1, d2 = (ab * ap).sum(k), (ac * ap).sum(k)
    d3, d4 = (ab * bp).sum(k), (ac * bp).sum(k)
    d5, d6 = (ab * cp).sum(k), (ac * cp).sum(k)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    one, zero = torch.ones_like(d1), torch.zeros_like(d1)

    def safe(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / torch.where(den == 0, one, den)

    denom = va + vb + vc
    v, w = safe(vb, denom), safe(vc, denom)
    t_ab, t_ac = safe(d1, d1 - d3), safe(d2, d2 - d6)
    t_bc = safe(d4 - d3, (d4 - d3) + (d5 - d6))
    # Ericson's tests in order, the first that holds wins: apply in reverse so earlier ones override.
    tests = [
        ((d1 <= 0) & (d2 <= 0), (one, zero, zero)),
        ((d3 >= 0) & (d4 <= d3), (zero, one, zero)),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), (1 - t_ab, t_ab, zero)),
        ((d6 >= 0) & (d5 <= d6), (zero, zero, one)),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), (1 - t_ac, zero, t_ac)),
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), (zero, 1 - t_bc, t_bc)),
    ]
    bary = [1 - v - w, v, w]
    for mask, value in reversed(tests):
        bary = [torch.where(mask, new, old) for new, old in zip(value, bary)]
    return torch.stack(bary, -1)


GPU_CHUNK = 1 << 17  # points per MeshIndex pass on a GPU (bounds the candidate arrays)
# points per TemplateIndex pass on a GPU: a 512^3 head's ~500k vertices at once (a pass launches some hundreds of
# kernels; the memory this takes: docs/benchmarks.md, "Engine tuning")
TEMPLATE_GPU_CHUNK = 1 << 19


class MeshIndex:
    """Closest-point queries on any triangle mesh for points at any distance (the fit error: input points from
    far off included): approximate candidate search, exact per candidate. Candidates come from scipy's k-d trees
    on the host, the exact tests run on `device`; on CPU chunks of points run on parallel threads. Large
    triangles whose corners are all far from a point can be missed: TemplateIndex is exact."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, candidates: int = 3, max_valence: int = 12,
                 centroid_candidates: int = 4, device: torch.device | str = "cpu"):
        from scipy.spatial import cKDTree  # scipy loads only where the fit needs it

        self.device = torch.device(device)
        self.vertices = np.asarray(vertices, np.float64)
        self.faces = np.asarray(faces, np.int64)
        self.tree = cKDTree(self.vertices)
        self.candidates = min(candidates, len(self.vertices))
        self.centroid_candidates = min(centroid_candidates, len(self.faces))
        self.centroid_tree = cKDTree(self.vertices[self.faces].mean(1))
        # Faces incident to each vertex, padded with the vertex's first face (duplicates are harmless) and
        # cut at max_valence: only fan centres (e.g. of the template's neck cap) exceed it. Long fan
        # triangles are also found through the nearest face centroids (centroid_candidates).
        order = np.argsort(self.faces.ravel(), kind="stable")
        vert_of = self.faces.ravel()[order]
        face_of = order // 3
        counts = np.bincount(vert_of, minlength=len(self.vertices))
        width = max(1, min(int(counts.max()), max_valence))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(len(vert_of)) - starts[vert_of]
        vf = np.full((len(self.vertices), width), -1, np.int64)
        keep = slot < width
        vf[vert_of[keep], slot[keep]] = face_of[keep]
        first = np.where(vf[:, :1] >= 0, vf[:, :1], 0)
        self.vertex_faces = torch.as_tensor(np.where(vf >= 0, vf, first).astype(np.int32), device=self.device)
        # Triangle corners as coordinate planes (corner, xyz, F) float32
        self._tri_planes = torch.as_tensor(self.vertices[self.faces], dtype=torch.float32,
                                           device=self.device).permute(1, 2, 0).contiguous()

    def closest(self, points: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closest mesh point among the triangles around the nearest `candidates` vertices and the
        `centroid_candidates` triangles with the nearest centroids:
        (face (N,), barycentric (N,3) float64, distance (N,)). On CPU chunks of points run on parallel threads
        (cpu.thread_map; each row's answer does not depend on the chunking)."""
        points = np.ascontiguousarray(points, np.float64)
        step = chunk if self.device.type == "cpu" else GPU_CHUNK
        chunks = [points[s : s + step] for s in range(0, max(len(points), 1), step)]  # one, maybe empty
        if self.device.type == "cpu":
            parts = thread_map(self._closest_chunk, chunks)
        else:  # one chunk at a time on the device
            parts = [self._closest_chunk(c) for c in chunks]
        index, closest, distance = (np.concatenate(a) for a in zip(*parts))
        return index, closest, distance

    @property
    def _workers(self) -> int:
        """cKDTree threads: one per thread_map thread on CPU, every core when the tests run on a GPU."""
        return 1 if self.device.type == "cpu" else -1

    def _nearest(self, p: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The `candidates` nearest vertices and the `centroid_candidates` nearest face centroids, (n,k) each,
        on the device."""
        _, near = self.tree.query(p, k=self.candidates, workers=self._workers)
        _, near_faces = self.centroid_tree.query(p, k=self.centroid_candidates, workers=self._workers)
        return (torch.as_tensor(near.reshape(len(p), -1), device=self.device),
                torch.as_tensor(near_faces.reshape(len(p), -1), device=self.device))

    def _closest_chunk(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(p) == 0:
            return np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0)
        near, near_faces = self._nearest(p)
        cand = torch.cat([self.vertex_faces[near].reshape(len(p), -1), near_faces.int()], 1)
        # Each face once: neighbouring vertices share most faces (~14 distinct of 36 slots on the template), so
        # the distinct ones go first (ascending; each repeat is written where its first copy went, the columns
        # past a row's distinct ones repeat its first) and the columns past the most distinct in a row are cut.
        # int32: sorts in half the time of int64.
        cand = cand.sort(dim=1).values
        slot = torch.cat([torch.ones_like(cand[:, :1], dtype=torch.bool), cand[:, 1:] != cand[:, :-1]], 1).cumsum(1) - 1
        cand = cand[:, :1].expand(-1, int(slot[:, -1].max()) + 1).clone().scatter_(1, slot, cand)  # (n, C)
        n, c = cand.shape
        rows = torch.arange(n, device=self.device)
        pt = torch.as_tensor(p.T, dtype=torch.float32, device=self.device).contiguous()
        d, bc = _point_triangle(self._tri_planes, pt, rows.repeat_interleave(c), cand.reshape(-1))
        best = d.view(n, c).argmin(dim=1)
        pick = rows * c + best
        return (cand[rows, best].cpu().numpy().astype(np.int64), bc[pick].double().cpu().numpy(),
                d[pick].double().cpu().numpy())


LEAF = 4  # triangles per TriangleTree leaf: the fastest of 4/8/16 (docs/benchmarks.md, "Engine tuning")


class TriangleTree:
    """Exact closest triangle of a mesh: a complete binary tree over the triangles (median splits of their
    centroids along each node's longest side; leaves of LEAF triangles, padded with repeats) with a box per node.
    A query descends once to a likely leaf (the child whose box is nearer, then whose centre is) for a first
    distance, then walks the tree breadth-first keeping only nodes whose box is no farther than that: every
    triangle that could be closer is tested. Bounds are float32 relative to the mesh's centre (with a slack far
    above their rounding), the answer is the closest triangle up to the float32 rounding of the distances (~1e-8 m
    at head scale; measured within 2e-8 m of a float64 brute force), the lowest index among equally close ones.
    Coordinates are kept as planes (3, ...): products and sums over xyz run on contiguous rows (a norm over a
    length-3 last axis took a third of the query's time on CPU). Torch only, on any device."""

    def __init__(self, tri: torch.Tensor):
        """tri (F,3,3) float64 triangle corners, F >= 1."""
        dev, n_tri = tri.device, tri.shape[0]
        if n_tri == 0:
            raise ValueError("TriangleTree needs at least one triangle")
        self.depth = max(0, math.ceil(math.log2(n_tri / LEAF)))
        size = LEAF << self.depth
        centre = tri.mean(1)
        order = torch.cat([torch.arange(n_tri, device=dev), torch.full((size - n_tri,), n_tri - 1, device=dev)])
        for level in range(self.depth):
            seg = order.view(1 << level, -1)
            c = centre[seg]
            axis = (c.amax(1) - c.amin(1)).argmax(1)
            key = c.gather(2, axis[:, None, None].expand(-1, seg.shape[1], 1)).squeeze(2)
            order = seg.gather(1, key.argsort(dim=1, stable=True)).reshape(-1)
        self.leaves = order.view(-1, LEAF)  # (leaves, LEAF) triangle ids
        self.origin = tri.reshape(-1, 3).mean(0)
        rel = tri - self.origin
        corners = rel[order].reshape(-1, 3 * LEAF, 3)
        lo, hi = [corners.amin(1)], [corners.amax(1)]
        for _ in range(self.depth):  # parents from children, up to the root
            lo.insert(0, torch.minimum(lo[0][0::2], lo[0][1::2]))
            hi.insert(0, torch.maximum(hi[0][0::2], hi[0][1::2]))
        self.lo = [t.float().T.contiguous() for t in lo]  # per level (3, nodes)
        self.hi = [t.float().T.contiguous() for t in hi]
        self.mid = [(a + b) / 2 for a, b in zip(self.lo, self.hi)]
        # per triangle: corners as planes (corner, xyz, F) and a bounding sphere (centroid (3,F), radius)
        self.planes = rel.float().permute(1, 2, 0).contiguous()
        self.centroid = (centre - self.origin).float().T.contiguous()
        self.radius = (tri - centre[:, None]).norm(dim=2).amax(1).float()
        # and its plane: unit normal (3,F) and offset (F,) (a degenerate triangle: zero normal, never pruned)
        normal = torch.linalg.cross(rel[:, 1] - rel[:, 0], rel[:, 2] - rel[:, 0])
        normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-300)
        self.normal = normal.float().T.contiguous()
        self.offset = (normal * rel[:, 0]).sum(1).float()

    def closest(self, p64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points (n,3) float64 -> closest triangle (n,) long, distance (n,) float32, barycentric (n,3) float32."""
        p = (p64 - self.origin).float().T.contiguous()  # (3, n)
        n, dev = p.shape[1], p.device
        # one descent: the child with the nearer box, on a tie (both contain the point) the nearer centre; both
        # children in one set of ops (each op is a kernel launch on a GPU)
        node = torch.zeros(n, dtype=torch.long, device=dev)
        p2 = p.repeat(1, 2)
        for level in range(1, self.depth + 1):
            children = torch.cat([2 * node, 2 * node + 1])
            box = self._box_sq(p2, level, children).view(2, n)
            mid = _sq(self.mid[level].index_select(1, children) - p2).view(2, n)
            node = 2 * node + ((box[1] < box[0]) | ((box[1] == box[0]) & (mid[1] < mid[0])))
        # a first distance: to the nearest of that leaf's triangles
        rows = torch.arange(n, device=dev)
        leaf = self.leaves.index_select(0, node).reshape(-1)
        first = _point_triangle(self.planes, p, rows.repeat_interleave(LEAF), leaf)[0]
        # slack: far above float32 rounding of the bounds at the points' distance from the mesh
        bound = first.view(n, LEAF).amin(1) + 1e-6 * (1.0 + _sq(p).sqrt())
        nodes = torch.zeros(n, dtype=torch.long, device=dev)
        for level in range(1, self.depth + 1):  # every node whose box may hold something nearer
            rows = rows.repeat_interleave(2)
            nodes = torch.stack([2 * nodes, 2 * nodes + 1], 1).reshape(-1)
            keep = torch.nonzero(self._box_sq(p.index_select(1, rows), level, nodes) <= bound[rows] ** 2).squeeze(1)
            rows, nodes = rows[keep], nodes[keep]
        rows = rows.repeat_interleave(LEAF)
        tris = self.leaves.index_select(0, nodes).reshape(-1)
        # the bounding spheres first: |p - c| - r <= bound
        reach = (bound.index_select(0, rows) + self.radius.index_select(0, tris)) ** 2
        keep = torch.nonzero(_sq(self.centroid.index_select(1, tris) - p.index_select(1, rows)) <= reach).squeeze(1)
        rows, tris = rows[keep], tris[keep]
        # then the planes: a triangle is no nearer than its plane
        plane = (self.normal.index_select(1, tris) * p.index_select(1, rows)).sum(0) - self.offset.index_select(0, tris)
        keep = torch.nonzero(plane.abs_() <= bound.index_select(0, rows)).squeeze(1)
        rows, tris = rows[keep], tris[keep]  # never empty for a point: its nearest triangle passes
        d, bary = _point_triangle(self.planes, p, rows, tris)
        best = torch.full((n,), math.inf, device=dev).scatter_reduce_(0, rows, d, "amin")
        won = torch.nonzero(d == best[rows]).squeeze(1)
        face = torch.full((n,), self.planes.shape[2], device=dev).scatter_reduce_(0, rows[won], tris[won], "amin")
        won = won[tris[won] == face[rows[won]]]
        out = torch.empty((n, 3), device=dev)
        out[rows[won]] = bary[won]
        return face, best, out

    def _box_sq(self, p: torch.Tensor, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Squared distance from points p (3,M) to the boxes of `nodes` (M,) at `level`."""
        lo, hi = self.lo[level].index_select(1, nodes), self.hi[level].index_select(1, nodes)
        return _sq((lo - p).clamp_min_(0) + (p - hi).clamp_min_(0))


def _point_triangle(planes: torch.Tensor, p: torch.Tensor, rows: torch.Tensor, tris: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (M,) from point rows[i] of p (3,n) to triangle tris[i] of planes (corner, xyz, F), both float32
    in one frame, and the barycentric (M,3) of its closest point. Worked relative to the point (float32 keeps
    sub-micrometre precision at head scale) on coordinate planes (contiguous rows for every product and sum)."""
    tri = planes.view(9, -1).index_select(1, tris).view(3, 3, -1) - p.index_select(1, rows)[None]
    bc = closest_point_on_triangles(torch.zeros(3, 1, device=p.device), tri[0], tri[1], tri[2], coord_dim=0)
    x = bc[:, 0] * tri[0] + bc[:, 1] * tri[1] + bc[:, 2] * tri[2]
    return _sq(x).sqrt_(), bc


def _sq(v: torch.Tensor) -> torch.Tensor:
    """Squared length over the first axis (xyz planes)."""
    return (v * v).sum(0)


class TemplateIndex:
    """The atlas surface: closest point (exact, TriangleTree), region labels, UVs. Numpy and torch only (no scipy on
    the way to a first head)."""

    def __init__(self, atlas: Atlas, device: torch.device | str = "cpu"):
        self.atlas = atlas
        self.device = torch.device(device)
        self.faces = np.asarray(atlas.faces, np.int64)
        corners = np.asarray(atlas.vertices, np.float64)[self.faces]
        self.tree = TriangleTree(torch.as_tensor(corners, device=self.device))
        self.face_island = _uv_islands(self.faces, atlas.uv)
        self._last: tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def closest(self, points: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(face (N,), barycentric (N,3) float64, distance (N,)) of each point's closest template point. The
        answer for the last query is kept (read-only), so asking again for the same points costs a comparison."""
        points = np.ascontiguousarray(points, np.float64)
        if not np.isfinite(points).all():  # NaN fails every bound: such a point would get no triangle
            raise errors.BackendError("non-finite points in a template query", code="internal_error")
        last = self._last
        if last is None or last[0].shape != points.shape or not np.array_equal(last[0], points):
            # one chunk at a time (bounds the candidate arrays); on CPU each op on torch's threads: chunks on
            # parallel threads (cpu.thread_map) were no faster (docs/benchmarks.md, "Engine tuning")
            step = chunk if self.device.type == "cpu" else TEMPLATE_GPU_CHUNK
            parts = [self._closest_chunk(points[s : s + step]) for s in range(0, len(points), step)]
            if parts:
                index, closest, distance = (np.concatenate(a) for a in zip(*parts))
                answer = (index, closest, distance)
            else:
                answer = (np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0))
            for a in answer:
                a.flags.writeable = False
            self._last = last = (points.copy(), answer)
        return last[1]

    def forget(self) -> None:
        """Drop the remembered last answer (benchmarks that ask again for the same points)."""
        self._last = None

    def nearest_region(self, points: np.ndarray) -> np.ndarray:
        """Region id (N,) int32 of each point's closest template point: that of its triangle's corner with the
        largest barycentric weight (region borders follow the same closest-point map as the UVs)."""
        face, bary, _ = self.closest(points)
        return self.atlas.region[self.faces[face, np.argmax(bary, axis=1)]].astype(np.int32)

    def uv(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ICT-layout UV (N,2) float32 of each point's closest template point, and that point's UV island."""
        face, bary, _ = self.closest(points)
        corner_uv = self.atlas.uv[face].astype(np.float64)  # (N, corner, 2)
        # corner by corner: numpy's sum over a length-3 axis is slower (docs/benchmarks.md, "Engine tuning")
        uv = bary[:, 0:1] * corner_uv[:, 0] + bary[:, 1:2] * corner_uv[:, 1] + bary[:, 2:3] * corner_uv[:, 2]
        return uv.astype(np.float32), self.face_island[face]

    def _closest_chunk(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        face, dist, bary = self.tree.closest(torch.as_tensor(p, device=self.device))
        return face.cpu().numpy(), bary.double().cpu().numpy(), dist.double().cpu().numpy()


def seam_faces(faces: np.ndarray, vertex_island: np.ndarray) -> int:
    """Faces whose corners take their UVs from different template UV islands."""
    isl = vertex_island[faces]
    return int(((isl[:, 0] != isl[:, 1]) | (isl[:, 0] != isl[:, 2])).sum())


def _uv_islands(faces: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """UV island per face (0, 1, ...): faces are joined across an edge when both edge ends carry the same UV in
    both."""
    nf = len(faces)
    # Key each corner by (vertex, rounded uv): a shared edge with identical corner keys is not a seam.
    uvq = np.round(uv.reshape(-1, 2) * 1e6).astype(np.int64)
    corner_key = _row_ids(np.column_stack([faces.reshape(-1), uvq])).reshape(nf, 3)
    e = np.stack([corner_key[:, [0, 1]], corner_key[:, [1, 2]], corner_key[:, [2, 0]]], 1).reshape(-1, 2)
    e = np.sort(e, axis=1)
    owner = np.repeat(np.arange(nf), 3)
    inv = _row_ids(e)
    order = np.argsort(inv, kind="stable")
    grouped = inv[order]
    same = grouped[1:] == grouped[:-1]
    a, b = owner[order][:-1][same], owner[order][1:][same]
    label = edge_labels(torch.as_tensor(a), torch.as_tensor(b), nf).numpy()
    return np.unique(label, return_inverse=True)[1].astype(np.int32)


def _row_ids(rows: np.ndarray) -> np.ndarray:
    """Id (N,) of each row of an (N, k) integer array among its distinct rows, numbered in lexicographic
    order (`np.unique(rows, axis=0, return_inverse=True)[1]`), through one packed int64 key per row when the
    columns' ranges fit (several times faster than sorting rows)."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    lo = rows.min(0)
    span = rows.max(0) - lo + 1
    if float(np.prod(span.astype(np.float64))) >= 2.0**62:
        return np.unique(rows, axis=0, return_inverse=True)[1].ravel()
    key = np.zeros(len(rows), np.int64)
    for j in range(rows.shape[1]):
        key = key * span[j] + (rows[:, j] - lo[j])
    return np.unique(key, return_inverse=True)[1].ravel()
