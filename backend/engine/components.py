"""Connected pieces of a triangle mesh and the removal of small ones, in torch (CPU or GPU).

Extraction runs this on the device that marched the cubes: at 512^3 the host version (scipy connected
components + a k-d tree) took ~1 s on an H100 host, longer than the network.

Labels come from hooking and pointer jumping (Shiloach-Vishkin style): every vertex points to a smaller
index or itself; each round, every edge whose end points have different parents hooks the larger one under
the smaller if it is a root (scatter amin), then pointers jump twice (x3 each) towards their roots. Edges
whose end points share a parent are dropped for good, so rounds shrink; a mesh needs a handful, with one
host sync each.
"""

from __future__ import annotations

import torch

TOUCH_CHUNK = 1 << 24  # distance-matrix entries per piece of the touch test


def component_labels(faces: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """(F,3) long faces -> (n_vertices,) long label per vertex: the smallest vertex index of its piece."""
    return edge_labels(torch.cat([faces[:, 0], faces[:, 1]]), torch.cat([faces[:, 1], faces[:, 2]]), n_vertices)


def edge_labels(u: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """Graph of n nodes and long edges (u[i], v[i]) -> (n,) long label per node: the smallest node of its piece."""
    parent = torch.arange(n + 1, device=u.device)  # slot n takes the hooks a round skips
    while True:
        pu, pv = parent[u], parent[v]
        differ = torch.nonzero(pu != pv).squeeze(1)  # the one host sync of a round (then index, not mask)
        if differ.numel() == 0:
            break
        u, v, pu, pv = u[differ], v[differ], pu[differ], pv[differ]
        hi, lo = torch.maximum(pu, pv), torch.minimum(pu, pv)
        # Only roots are hooked: redirecting a pointer that has not reached its root yet would cut its tree's
        # link. A root is its tree's smallest index, so lo < hi lies in another tree: no cycle, and the label
        # stays the piece's smallest vertex. Edges skipped now are hooked once the jumps reach their roots.
        hi = torch.where(parent[hi] == hi, hi, n)
        parent.scatter_reduce_(0, hi, lo, reduce="amin")
        # two triple jumps a round without a check (each a host sync before): the next round's edges see them
        parent = parent[parent[parent]]
        parent = parent[parent[parent]]
    while True:  # every pointer to its root (pointers only go down, so a fixed point is reached)
        jumped = parent[parent[parent]]
        if torch.equal(jumped, parent):
            return parent[:n]
        parent = jumped


def drop_small_pieces(vertices: torch.Tensor, faces: torch.Tensor, min_fraction: float, touch: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop pieces with fewer than min_fraction x (largest piece's face count) faces unless they come within
    `touch` of a large piece; returns vertices and faces re-indexed, and the number of pieces removed.
    Why `touch`: marching cubes resolves ambiguous cells by table, so two valid triangulations of the same
    lattice values can split a few faces off the main surface in one and not the other; such a piece lies in a
    cell next to the main surface (within a cell diagonal), a floater does not."""
    if min_fraction <= 0 or faces.shape[0] == 0:
        return vertices, faces, 0
    n = vertices.shape[0]
    label = component_labels(faces, n)
    face_count = torch.bincount(label[faces[:, 0]], minlength=n)
    present = face_count > 0
    keep = face_count >= min_fraction * face_count.max()
    small = present & ~keep
    small_ids = torch.nonzero(small).squeeze(1)
    if touch > 0 and small_ids.numel():
        in_small = torch.nonzero(small[label]).squeeze(1)
        sv, sl = vertices[in_small], label[in_small]
        # only large-piece vertices inside some small piece's box (grown by `touch`) can be near it
        slot = torch.full((n,), -1, dtype=torch.long, device=vertices.device)
        slot[small_ids] = torch.arange(small_ids.numel(), device=vertices.device)
        index = slot[sl][:, None].expand(-1, 3)
        lo = torch.full((small_ids.numel(), 3), float("inf"), device=vertices.device, dtype=vertices.dtype)
        lo = lo.scatter_reduce(0, index, sv, reduce="amin") - touch
        hi = torch.empty_like(lo).scatter_reduce(0, index, sv, reduce="amax", include_self=False) + touch
        large = torch.nonzero(keep[label]).squeeze(1)
        inside = torch.zeros(large.numel(), dtype=torch.bool, device=vertices.device)
        step = max(1, TOUCH_CHUNK // small_ids.numel())
        for s in range(0, large.numel(), step):
            v = vertices[large[s : s + step], None, :]
            inside[s : s + step] = ((v >= lo) & (v <= hi)).all(2).any(1)
        cand = vertices[large[inside]]
        if cand.shape[0]:
            near = torch.zeros(sv.shape[0], dtype=torch.bool, device=sv.device)
            step = max(1, TOUCH_CHUNK // cand.shape[0])
            for s in range(0, sv.shape[0], step):
                near[s : s + step] = torch.cdist(sv[s : s + step], cand).amin(1) <= touch
            keep[sl[near]] = True
    keep &= present
    kept_faces = faces[keep[label[faces[:, 0]]]]
    used = torch.zeros(n, dtype=torch.bool, device=faces.device)
    used[kept_faces.reshape(-1)] = True
    remap = torch.cumsum(used, 0) - 1
    return vertices[used], remap[kept_faces], int(present.sum() - keep.sum())
