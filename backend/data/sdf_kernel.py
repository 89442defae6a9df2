"""Distances and winding numbers of `ClusteredMesh.query` as one Triton kernel (training-data sampler).

The torch path gathers a (points, k clusters, 36, S) triangle table through memory and runs hundreds of
small kernels per query. Here one program takes BLOCK points of one mesh (points sorted into Morton order
first, so that a block is compact) and keeps everything on chip:

* distance: a first sweep over all cluster boxes (CHUNK clusters a step) finds, per point, the cluster with
  the nearest box; the exact distance to that cluster's kept triangles is an upper bound `best`. The main
  sweep then visits a cluster's triangles only where its box is nearer than `best` for some point of the
  block (a box distance is a lower bound on the distance to any triangle in it), so the minimum is exact.
* winding number per closed group: per cluster, exact solid angles (Van Oosterom & Strackee) for points
  within `beta` cluster radii of its centre, else the first-order far-field (dipole) term (Barill et al.
  2018). A point whose winding number for any group is more than 0.25 away from an integer (where the
  far-field error could flip inside/outside) is computed again with 4x beta and then, if still ambiguous,
  with exact solid angles for every triangle (the torch path's rule, per group instead of the total).

Hierarchy: superclusters of SUPER consecutive clusters (consecutive clusters are neighbours: they come from a
median-split tree, and never mix groups) with their own box, centre, radius and dipole. The main sweep tests
SUPER_CHUNK superclusters at a time as one (BLOCK, SUPER_CHUNK) tile; one far from every point of the block
(and beyond `best`) costs its dipole term; an entered one tests its clusters as one (BLOCK, SUPER) tile, and
only clusters that need it load their S triangles. Both follow the torch path's formulas
(mesh._pair_sq_dist, mesh._pair_solid_angle) in float32; atan2 is a polynomial (Cephes atanf, ~2e-7
relative) because Triton's interpreter has no libdevice. Under TRITON_INTERPRET=1 the kernel runs on the CPU
(tests).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .mesh import ClusteredMesh

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the sampler keeps the torch path
    triton = None

BLOCK = 16     # points per program (see docs/dev/gpu_notes.md: not yet tuned on a GPU)
CHUNK = 32     # cluster boxes per step of the upper-bound sweep
SUPER = 8      # clusters per supercluster
SUPER_CHUNK = 16   # superclusters tested at a time
BETA = 2.0     # far-field criterion: |p - centre| > BETA * radius (Barill et al. use 2)
NUM_WARPS = 4
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit
    def _atan2(y, x):
        ax = tl.abs(x)
        ay = tl.abs(y)
        hi = tl.maximum(ax, ay)
        t = tl.minimum(ax, ay) / tl.where(hi > 0, hi, 1.0)
        big = t > 0.41421356237309503
        z = tl.where(big, (t - 1.0) / (t + 1.0), t)
        zz = z * z
        r = (((8.05374449538e-2 * zz - 1.38776856032e-1) * zz + 1.99777106478e-1) * zz - 3.33329491539e-1) * zz * z + z
        r = tl.where(big, r + 0.7853981633974483, r)
        r = tl.where(ay > ax, 1.5707963267948966 - r, r)
        r = tl.where(x < 0, 3.141592653589793 - r, r)
        return tl.where(y < 0, -r, r)

    @triton.jit
    def _seg(xx, xy, xz, ex, ey, ez, inv):
        u = tl.minimum(tl.maximum((xx * ex + xy * ey + xz * ez) * inv, 0.0), 1.0)
        qx = xx - u * ex
        qy = xy - u * ey
        qz = xz - u * ez
        return qx * qx + qy * qy + qz * qz

    @triton.jit
    def _corner_offsets(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
        """p - a, p - b, p - c, component by component (shared by the distance and the solid angle)."""
        return px - ax, py - ay, pz - az, px - bx, py - by, pz - bz, px - cx, py - cy, pz - cz

    @triton.jit
    def _sq_dist(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz, keep):
        """min over triangles (axis 1) of the squared distance; p (BLOCK,1), corners (1,S) or (BLOCK,S)."""
        abx = bx - ax
        aby = by - ay
        abz = bz - az
        bcx = cx - bx
        bcy = cy - by
        bcz = cz - bz
        cax = ax - cx
        cay = ay - cy
        caz = az - cz
        nx = aby * -caz - abz * -cay
        ny = abz * -cax - abx * -caz
        nz = abx * -cay - aby * -cax
        nn = nx * nx + ny * ny + nz * nz
        inv_nn = tl.where(nn > 0, 1.0 / tl.where(nn > 0, nn, 1.0), 0.0)
        tiny = 1.1754943508222875e-38
        iab = 1.0 / tl.maximum(abx * abx + aby * aby + abz * abz, tiny)
        ibc = 1.0 / tl.maximum(bcx * bcx + bcy * bcy + bcz * bcz, tiny)
        ica = 1.0 / tl.maximum(cax * cax + cay * cay + caz * caz, tiny)
        apx, apy, apz, bpx, bpy, bpz, cpx, cpy, cpz = _corner_offsets(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        # in-plane edge normals n x edge point into the triangle
        s1 = apx * (ny * abz - nz * aby) + apy * (nz * abx - nx * abz) + apz * (nx * aby - ny * abx)
        s2 = bpx * (ny * bcz - nz * bcy) + bpy * (nz * bcx - nx * bcz) + bpz * (nx * bcy - ny * bcx)
        s3 = cpx * (ny * caz - nz * cay) + cpy * (nz * cax - nx * caz) + cpz * (nx * cay - ny * cax)
        inside = (s1 >= 0) & (s2 >= 0) & (s3 >= 0) & (nn > 0)
        dn = apx * nx + apy * ny + apz * nz
        plane = dn * dn * inv_nn
        edge = tl.minimum(tl.minimum(_seg(apx, apy, apz, abx, aby, abz, iab), _seg(bpx, bpy, bpz, bcx, bcy, bcz, ibc)),
                          _seg(cpx, cpy, cpz, cax, cay, caz, ica))
        d2 = tl.where(inside, plane, edge)
        d2 = tl.where(keep != 0, d2, float("inf"))
        return tl.min(d2, axis=1)

    @triton.jit
    def _solid(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz, valid):
        """sum over triangles (axis 1) of signed solid angle / (4 pi); shapes as _sq_dist."""
        abx = bx - ax
        aby = by - ay
        abz = bz - az
        acx = cx - ax
        acy = cy - ay
        acz = cz - az
        nx = aby * acz - abz * acy
        ny = abz * acx - abx * acz
        nz = abx * acy - aby * acx
        apx, apy, apz, bpx, bpy, bpz, cpx, cpy, cpz = _corner_offsets(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        la = tl.sqrt(apx * apx + apy * apy + apz * apz)
        lb = tl.sqrt(bpx * bpx + bpy * bpy + bpz * bpz)
        lc = tl.sqrt(cpx * cpx + cpy * cpy + cpz * cpz)
        det = -(apx * nx + apy * ny + apz * nz)
        den = (la * lb * lc + (apx * bpx + apy * bpy + apz * bpz) * lc + (bpx * cpx + bpy * cpy + bpz * cpz) * la
               + (cpx * apx + cpy * apy + cpz * apz) * lb)
        om = tl.where(valid != 0, _atan2(det, den), 0.0)
        return tl.sum(om, axis=1) * 0.15915494309189535

    @triton.jit
    def _box_sq(px, py, pz, lox, loy, loz, hix, hiy, hiz):
        dx = tl.maximum(tl.maximum(lox - px, px - hix), 0.0)
        dy = tl.maximum(tl.maximum(loy - py, py - hiy), 0.0)
        dz = tl.maximum(tl.maximum(loz - pz, pz - hiz), 0.0)
        return dx * dx + dy * dy + dz * dz

    @triton.jit
    def _rows(px, py, pz, tab, rmask, active, beta2):
        """For table rows `tab` (K,) (clusters or superclusters; rmask: real rows): squared box distance, near
        mask (within beta radii of the centre) and dipole term, each (BLOCK, K)."""
        inf = float("inf")
        lb2 = _box_sq(px[:, None], py[:, None], pz[:, None], tl.load(tab + 0, mask=rmask, other=inf)[None, :],
                      tl.load(tab + 1, mask=rmask, other=inf)[None, :],
                      tl.load(tab + 2, mask=rmask, other=inf)[None, :],
                      tl.load(tab + 3, mask=rmask, other=-inf)[None, :],
                      tl.load(tab + 4, mask=rmask, other=-inf)[None, :],
                      tl.load(tab + 5, mask=rmask, other=-inf)[None, :])
        rx = tl.load(tab + 6, mask=rmask, other=0.0)[None, :] - px[:, None]
        ry = tl.load(tab + 7, mask=rmask, other=0.0)[None, :] - py[:, None]
        rz = tl.load(tab + 8, mask=rmask, other=0.0)[None, :] - pz[:, None]
        d2 = rx * rx + ry * ry + rz * rz
        r = tl.load(tab + 12, mask=rmask, other=0.0)[None, :]
        near = (d2 <= beta2 * (r * r)) & active[:, None] & rmask[None, :]
        dot = (rx * tl.load(tab + 9, mask=rmask, other=0.0)[None, :]
               + ry * tl.load(tab + 10, mask=rmask, other=0.0)[None, :]
               + rz * tl.load(tab + 11, mask=rmask, other=0.0)[None, :])
        d2 = tl.where(d2 > 0, d2, 1.0)          # a point at a centre is near it; padding lanes sit at 0
        far = tl.where(rmask[None, :], dot / (12.566370614359172 * d2 * tl.sqrt(d2)), 0.0)
        return lb2, near, far

    @triton.jit
    def _sweep(px, py, pz, active, best2, b, tri_ptr, keep_ptr, valid_ptr, ctab_ptr, stab_ptr, sup_start_ptr,
               grp_sup_ptr, wind_ptr, woffs, stats_ptr, n_clusters, n_supers, g_lo, g_hi, beta2, amb_tol,
               S: tl.constexpr, SP: tl.constexpr, SCH: tl.constexpr, NEED_D: tl.constexpr, NEED_W: tl.constexpr,
               COUNT: tl.constexpr):
        """Distance (into best2) and/or per-group winding numbers (stored where `active`); returns best2 and
        the points whose winding number is ambiguous for some group. Superclusters are tested SCH at a time,
        the clusters of an entered supercluster (at most SP) all at once; triangles one cluster at a time."""
        s = tl.arange(0, S)
        ks = tl.arange(0, SCH)
        kc = tl.arange(0, SP)
        amb = px != px
        for g in range(g_lo, g_hi):
            s_lo = tl.load(grp_sup_ptr + g)
            s_hi = tl.load(grp_sup_ptr + g + 1)
            wg = tl.zeros_like(px)
            for s0 in range(s_lo, s_hi, SCH):
                sm = (s0 + ks) < s_hi
                lb2s, near_s, far_s = _rows(px, py, pz, stab_ptr + (b * n_supers + s0 + ks) * 16, sm, active, beta2)
                go = tl.zeros([SCH], tl.int32)
                if NEED_D:
                    go = go | tl.max((lb2s < best2[:, None]).to(tl.int32), axis=0)
                if NEED_W:
                    go = go | tl.max(near_s.to(tl.int32), axis=0)
                    wg += tl.sum(tl.where(go[None, :] > 0, 0.0, far_s), axis=1)
                if COUNT:
                    tl.atomic_add(stats_ptr + 3, tl.sum(sm.to(tl.int32), axis=0))
                    tl.atomic_add(stats_ptr + 4, tl.sum(go, axis=0))
                if tl.max(go, axis=0) > 0:
                    for j in range(0, SCH):
                        if tl.sum(tl.where(ks == j, go, 0), axis=0) > 0:
                            c_lo = tl.load(sup_start_ptr + s0 + j)
                            c_hi = tl.load(sup_start_ptr + s0 + j + 1)
                            cm = (c_lo + kc) < c_hi
                            lb2c, near_c, far_c = _rows(px, py, pz, ctab_ptr + (b * n_clusters + c_lo + kc) * 16, cm,
                                                        active, beta2)
                            if NEED_W:
                                wg += tl.sum(tl.where(near_c, 0.0, far_c), axis=1)
                                any_near = tl.max(near_c.to(tl.int32), axis=0)
                            for jj in range(0, c_hi - c_lo):
                                col = kc[None, :] == jj
                                visit_d = 0
                                visit_w = 0
                                if NEED_D:     # against the current best: it shrinks along the loop
                                    lbj = tl.min(tl.where(col, lb2c, float("inf")), axis=1)
                                    visit_d = tl.max((lbj < best2).to(tl.int32), axis=0)
                                if NEED_W:
                                    visit_w = tl.sum(tl.where(kc == jj, any_near, 0), axis=0)
                                if COUNT:
                                    tl.atomic_add(stats_ptr + 5, 1)
                                    tl.atomic_add(stats_ptr + 6, tl.where(visit_d > 0, 1, 0))
                                    tl.atomic_add(stats_ptr + 7, tl.where(visit_w > 0, 1, 0))
                                if visit_d + visit_w > 0:
                                    row = b * n_clusters + c_lo + jj
                                    tb = tri_ptr + row * (9 * S) + s
                                    ax = tl.load(tb + 0 * S)[None, :]
                                    ay = tl.load(tb + 1 * S)[None, :]
                                    az = tl.load(tb + 2 * S)[None, :]
                                    bx = tl.load(tb + 3 * S)[None, :]
                                    by = tl.load(tb + 4 * S)[None, :]
                                    bz = tl.load(tb + 5 * S)[None, :]
                                    cx = tl.load(tb + 6 * S)[None, :]
                                    cy = tl.load(tb + 7 * S)[None, :]
                                    cz = tl.load(tb + 8 * S)[None, :]
                                    if NEED_D:
                                        if visit_d > 0:
                                            keep = tl.load(keep_ptr + row * S + s)[None, :]
                                            d2 = _sq_dist(px[:, None], py[:, None], pz[:, None], ax, ay, az, bx, by,
                                                          bz, cx, cy, cz, keep)
                                            best2 = tl.minimum(best2, d2)
                                    if NEED_W:
                                        if visit_w > 0:
                                            near = tl.max(tl.where(col, near_c.to(tl.int32), 0), axis=1) > 0
                                            valid = tl.load(valid_ptr + (c_lo + jj) * S + s)[None, :]
                                            exact = _solid(px[:, None], py[:, None], pz[:, None], ax, ay, az, bx, by,
                                                           bz, cx, cy, cz, valid)
                                            wg += tl.where(near, exact, 0.0)
            if NEED_W:
                tl.store(wind_ptr + woffs + g, wg, mask=active)
                amb = amb | (tl.abs(wg - tl.floor(wg + 0.5)) > amb_tol)
        return best2, amb & active

    @triton.jit(do_not_specialize=["n_points", "n_clusters", "n_supers", "n_groups", "g_lo", "g_hi"])
    def _query_kernel(pts_ptr, perm_ptr, tri_ptr, keep_ptr, valid_ptr, ctab_ptr, stab_ptr, sup_start_ptr,
                      grp_sup_ptr, dist_ptr, wind_ptr, stats_ptr, n_points, n_clusters, n_supers, n_groups, g_lo,
                      g_hi, beta2, amb_tol, S: tl.constexpr, SP: tl.constexpr, SCH: tl.constexpr,
                      BLOCK_N: tl.constexpr, CHUNK_C: tl.constexpr, NEED_D: tl.constexpr, NEED_W: tl.constexpr,
                      COUNT: tl.constexpr):
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_points
        idx = tl.load(perm_ptr + b * n_points + offs, mask=mask, other=0)
        prow = b * n_points + idx
        px = tl.load(pts_ptr + prow * 3 + 0, mask=mask, other=0.0)
        py = tl.load(pts_ptr + prow * 3 + 1, mask=mask, other=0.0)
        pz = tl.load(pts_ptr + prow * 3 + 2, mask=mask, other=0.0)
        best2 = tl.full([BLOCK_N], float("inf"), tl.float32)
        if NEED_D:
            # upper bound: exact distance to the kept triangles of the cluster whose box is nearest
            lb_min = tl.full([BLOCK_N], float("inf"), tl.float32)
            arg = tl.zeros([BLOCK_N], tl.int32)
            cc = tl.arange(0, CHUNK_C)
            for c0 in range(0, n_clusters, CHUNK_C):
                cm = (c0 + cc) < n_clusters
                tab = ctab_ptr + (b * n_clusters + c0 + cc) * 16
                lb2 = _box_sq(px[:, None], py[:, None], pz[:, None],
                              tl.load(tab + 0, mask=cm, other=float("inf"))[None, :],
                              tl.load(tab + 1, mask=cm, other=float("inf"))[None, :],
                              tl.load(tab + 2, mask=cm, other=float("inf"))[None, :],
                              tl.load(tab + 3, mask=cm, other=float("-inf"))[None, :],
                              tl.load(tab + 4, mask=cm, other=float("-inf"))[None, :],
                              tl.load(tab + 5, mask=cm, other=float("-inf"))[None, :])
                m = tl.min(lb2, axis=1)
                better = m < lb_min
                lb_min = tl.where(better, m, lb_min)
                arg = tl.where(better, c0 + tl.argmin(lb2, axis=1).to(tl.int32), arg)
            s = tl.arange(0, S)
            row = b * n_clusters + arg
            tb = tri_ptr + (row * (9 * S))[:, None] + s[None, :]
            keep = tl.load(keep_ptr + (row * S)[:, None] + s[None, :])
            best2 = _sq_dist(px[:, None], py[:, None], pz[:, None], tl.load(tb + 0 * S), tl.load(tb + 1 * S),
                             tl.load(tb + 2 * S), tl.load(tb + 3 * S), tl.load(tb + 4 * S), tl.load(tb + 5 * S),
                             tl.load(tb + 6 * S), tl.load(tb + 7 * S), tl.load(tb + 8 * S), keep)
            best2 = tl.where(mask, best2, -1.0)     # padding lanes never ask for a visit
        woffs = prow * n_groups
        best2, amb = _sweep(px, py, pz, mask, best2, b, tri_ptr, keep_ptr, valid_ptr, ctab_ptr, stab_ptr,
                            sup_start_ptr, grp_sup_ptr, wind_ptr, woffs, stats_ptr, n_clusters, n_supers, g_lo, g_hi,
                            beta2, amb_tol, S, SP, SCH, NEED_D, NEED_W, COUNT)
        if NEED_D:
            tl.store(dist_ptr + prow, tl.sqrt(tl.maximum(best2, 0.0)), mask=mask)
        if NEED_W:
            n1 = tl.sum(amb.to(tl.int32), axis=0)
            if n1 > 0:     # far-field error could matter: 4x the radius, then every triangle exact
                tl.atomic_add(stats_ptr + 0, n1)
                best2, amb = _sweep(px, py, pz, amb, best2, b, tri_ptr, keep_ptr, valid_ptr, ctab_ptr, stab_ptr,
                                    sup_start_ptr, grp_sup_ptr, wind_ptr, woffs, stats_ptr, n_clusters, n_supers,
                                    g_lo, g_hi, beta2 * 16.0, amb_tol, S, SP, SCH, False, True, COUNT)
                n2 = tl.sum(amb.to(tl.int32), axis=0)
                if n2 > 0:
                    tl.atomic_add(stats_ptr + 1, n2)
                    best2, amb = _sweep(px, py, pz, amb, best2, b, tri_ptr, keep_ptr, valid_ptr, ctab_ptr, stab_ptr,
                                        sup_start_ptr, grp_sup_ptr, wind_ptr, woffs, stats_ptr, n_clusters, n_supers,
                                        g_lo, g_hi, 3.0e38, amb_tol, S, SP, SCH, False, True, COUNT)
                    tl.atomic_add(stats_ptr + 2, tl.sum(amb.to(tl.int32), axis=0))


def _structure(accel: ClusteredMesh, super_size: int) -> dict:
    """Per accelerator (cached): superclusters (runs of `super_size` consecutive clusters of one group)."""
    cache = accel.__dict__.setdefault("_sdf_kernel", {})
    if super_size not in cache:
        gb = accel.group_bounds
        start: list[int] = []
        grp = [0]
        for g in range(accel.n_groups):
            start += list(range(gb[g], gb[g + 1], super_size))
            grp.append(len(start))
        start.append(accel.n_clusters)
        sizes = np.diff(start)
        dev = accel.device
        s = accel.cluster_faces.shape[1]
        sp = triton.next_power_of_2(s) if triton is not None else s
        cache[super_size] = {
            "sup_start": torch.as_tensor(start, dtype=torch.int32, device=dev),
            "grp_sup": torch.as_tensor(grp, dtype=torch.int32, device=dev),
            "super_of": torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes), device=dev),
            "n_supers": len(sizes), "S": sp,
            "valid": torch.nn.functional.pad(accel.valid, (0, sp - s)).to(torch.int8).contiguous(),
        }
    return cache[super_size]


def prepare(accel: ClusteredMesh, verts: torch.Tensor, face_mask: torch.Tensor | None = None,
            super_size: int | None = None) -> dict:
    """Per-mesh tables (float32): triangle corners (B,C,9,S) component-major, keep flags (B,C,S), cluster and
    supercluster rows (B,C,16)/(B,SC,16) = box lo, hi of the kept triangles (empty: +inf, -inf), centre,
    dipole, radius (max corner distance from the centre), 3 unused."""
    st = _structure(accel, SUPER if super_size is None else super_size)
    verts = verts.float()
    bsz = verts.shape[0]
    c, s = accel.cluster_faces.shape
    sp = st["S"]
    cv = verts[:, accel.cluster_verts]                                         # (B,C,3S,3)
    corners = cv.view(bsz, c, s, 3, 3)
    keep = accel.valid.expand(bsz, -1, -1)
    if face_mask is not None:
        keep = keep & face_mask[:, accel.cluster_faces]
    tri = corners.permute(0, 1, 3, 4, 2).reshape(bsz, c, 9, s)
    k3 = keep.repeat_interleave(3, dim=2)[..., None]
    lo = torch.where(k3, cv, float("inf")).amin(2)
    hi = torch.where(k3, cv, float("-inf")).amax(2)
    valid3 = accel.valid.repeat_interleave(3, dim=1)[None, :, :, None]
    centre = (cv * valid3).sum(2) / valid3.sum(2)
    a, b_, c_ = corners.unbind(3)
    dipole = (0.5 * torch.cross(b_ - a, c_ - a, dim=-1) * accel.valid[None, :, :, None]).sum(2)
    radius = (cv - centre[:, :, None]).norm(dim=-1).amax(2)
    pad = torch.zeros(bsz, c, 3, device=verts.device)
    ctab = torch.cat([lo, hi, centre, dipole, radius[..., None], pad], -1).contiguous()
    so = st["super_of"]
    nsup = st["n_supers"]
    idx3 = so[None, :, None].expand(bsz, -1, 3)
    slo = torch.full((bsz, nsup, 3), float("inf"), device=verts.device).scatter_reduce(1, idx3, lo, "amin")
    shi = torch.full((bsz, nsup, 3), float("-inf"), device=verts.device).scatter_reduce(1, idx3, hi, "amax")
    count = torch.zeros(nsup, device=verts.device).index_add(0, so, torch.ones(c, device=verts.device))
    scentre = torch.zeros(bsz, nsup, 3, device=verts.device).index_add(1, so, centre) / count[None, :, None]
    sdip = torch.zeros(bsz, nsup, 3, device=verts.device).index_add(1, so, dipole)
    rad_c = (cv - scentre[:, so][:, :, None]).norm(dim=-1).amax(2)            # (B,C)
    srad = torch.zeros(bsz, nsup, device=verts.device).scatter_reduce(1, so[None].expand(bsz, -1), rad_c, "amax")
    stab = torch.cat([slo, shi, scentre, sdip, srad[..., None], pad[:, :nsup]], -1).contiguous()
    if sp > s:
        tri = torch.nn.functional.pad(tri, (0, sp - s))
        keep = torch.nn.functional.pad(keep, (0, sp - s))
    return {"tri": tri.contiguous(), "keep": keep.to(torch.int8).contiguous(), "ctab": ctab, "stab": stab,
            "super_size": SUPER if super_size is None else super_size, "face_mask": face_mask}


def morton_order(points: torch.Tensor, bits: int = 10) -> torch.Tensor:
    """(B,N) int32 permutation per row that sorts points (B,N,3) along a Morton curve of their bounding box."""
    lo = points.amin(1, keepdim=True)
    size = (points.amax(1, keepdim=True) - lo).clamp_min(1e-12)
    q = ((points - lo) / size * (2**bits - 1)).clamp(0, 2**bits - 1).to(torch.int64)
    code = torch.zeros(points.shape[:2], dtype=torch.int64, device=points.device)
    for axis in range(3):
        x = q[..., axis]
        x = (x | (x << 16)) & 0x030000FF
        x = (x | (x << 8)) & 0x0300F00F
        x = (x | (x << 4)) & 0x030C30C3
        x = (x | (x << 2)) & 0x09249249
        code |= x << axis
    return code.argsort(dim=1).to(torch.int32)


def query(accel: ClusteredMesh, points: torch.Tensor, verts: torch.Tensor, face_mask: torch.Tensor | None = None,
          need_winding: bool = True, need_distance: bool = True, beta: float | None = None, block: int | None = None,
          super_size: int | None = None, sort: bool = True, count: bool = False, num_warps: int | None = None,
          ambiguous: float = 0.25, groups: tuple[int, int] | None = None,
          tables: dict | None = None) -> dict[str, torch.Tensor]:
    """ClusteredMesh.query's answers (float32): distance (B,N) to the nearest triangle with face_mask (B,F)
    True (all without a mask), winding (B,N,G) per group; plus retries (3,) int32: points recomputed with 4x
    beta, points recomputed with every triangle exact, points still ambiguous after that (on the surface).
    With `count`, `visits` (5,) int32 (slower: atomics in the loops): superclusters tested, entered; clusters
    tested, visited for the distance, visited for exact solid angles (over all blocks and sweeps).
    `ambiguous`: how far from an integer a winding number must be to be recomputed (0: always, for tests).
    `groups` (lo, hi): winding numbers of groups lo..hi-1 only (the others are 0). `tables`: prepare()'s
    output for these verts, to share between queries (its face mask is the one used)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not need_winding and not need_distance:
        raise ValueError("nothing to compute")
    beta = BETA if beta is None else beta             # module constants read per call: benchmarks override them
    block = BLOCK if block is None else block
    super_size = SUPER if super_size is None else super_size
    num_warps = NUM_WARPS if num_warps is None else num_warps
    bsz, n = points.shape[:2]
    dev = points.device
    st = _structure(accel, super_size)
    if tables is not None and tables["super_size"] != super_size:
        raise ValueError(f"tables were prepared for superclusters of {tables['super_size']}, not {super_size}")
    if tables is not None and tables["face_mask"] is not face_mask and need_distance:
        raise ValueError("tables were prepared with another face mask")
    tabs = tables or prepare(accel, verts, face_mask if need_distance else None, super_size)
    pts = points.float().contiguous()
    perm = morton_order(pts) if sort else torch.arange(n, dtype=torch.int32, device=dev).expand(bsz, -1).contiguous()
    g = accel.n_groups
    dist = torch.empty(bsz, n, device=dev) if need_distance else torch.empty(1, device=dev)
    g_lo, g_hi = (0, g) if groups is None else groups
    if not 0 <= g_lo < g_hi <= g:
        raise ValueError(f"groups {groups} outside 0..{g}")
    wind = torch.zeros(bsz, n, g, device=dev) if need_winding else torch.empty(1, device=dev)
    stats = torch.zeros(8, dtype=torch.int32, device=dev)
    if n:
        _query_kernel[(triton.cdiv(n, block), bsz)](
            pts, perm, tabs["tri"], tabs["keep"], st["valid"], tabs["ctab"], tabs["stab"], st["sup_start"],
            st["grp_sup"], dist, wind, stats, n, accel.n_clusters, st["n_supers"], g, g_lo, g_hi, float(beta) ** 2,
            float(ambiguous),
            S=st["S"], SP=triton.next_power_of_2(super_size), SCH=SUPER_CHUNK, BLOCK_N=block, CHUNK_C=CHUNK,
            NEED_D=need_distance, NEED_W=need_winding,
            COUNT=count, num_warps=num_warps)
    out = {"retries": stats[:3]}
    if count:
        out["visits"] = stats[3:]
    if need_winding:
        out["winding"] = wind
    if need_distance:
        out["distance"] = dist
    return out

