"""Signed distances and winding numbers against closed analytic shapes (box: the mesh IS the shape;
sphere: within the polygonisation error)."""

from __future__ import annotations

import numpy as np
import torch

from backend.data import mesh


def box_mesh(half: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed outward box [-half, half] with every side split into n x n quads (2 triangles each)."""
    verts: list[np.ndarray] = []
    faces: list[tuple[int, int, int]] = []
    t = np.linspace(-1, 1, n + 1)
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u, v = [a for a in range(3) if a != axis]
            base = len(verts)
            for i in range(n + 1):
                for j in range(n + 1):
                    p = np.zeros(3)
                    p[axis], p[u], p[v] = sign, t[i], t[j]
                    verts.append(p * half)
            for i in range(n):
                for j in range(n):
                    a, b, c, d = (base + i * (n + 1) + j, base + (i + 1) * (n + 1) + j,
                                  base + (i + 1) * (n + 1) + j + 1, base + i * (n + 1) + j + 1)
                    tri = [(a, b, c), (a, c, d)]
                    # orient outward: the normal of (a,b,c) is +axis when (u,v,axis) is right-handed
                    right = np.cross(np.eye(3)[u], np.eye(3)[v])[axis] > 0
                    if (sign > 0) != right:
                        tri = [(a, c, b), (a, d, c)]
                    faces += tri
    points = np.asarray(verts)
    # weld duplicated edge vertices so the box is one closed manifold
    key = np.round(points / half * n).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return points[first], inverse.reshape(-1)[np.asarray(faces)]


def box_sdf(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)


def icosphere(level: int) -> tuple[np.ndarray, np.ndarray]:
    t = (1 + 5 ** 0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [np.asarray(x, float) / np.linalg.norm(x) for x in v]
    faces = f
    for _ in range(level):
        cache: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int) -> int:
            k = (min(a, b), max(a, b))
            if k not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[k] = len(verts) - 1
            return cache[k]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.asarray(verts), np.asarray(faces)


def test_box_mesh_is_closed():
    from backend.data import topology

    v, f = box_mesh(np.array([0.05, 0.08, 0.03]), 6)
    assert topology.is_watertight(f) and topology.signed_volume(v, f) > 0
    np.testing.assert_allclose(topology.signed_volume(v, f), 0.1 * 0.16 * 0.06, rtol=1e-12)


def test_box_sdf_exact():
    half = np.array([0.05, 0.08, 0.03])
    v, f = box_mesh(half, 6)
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-0.12, 0.12, (300, 3)),
                          rng.uniform(-1, 1, (300, 3)) * half * 1.02])            # many points near the faces
    verts = torch.as_tensor(v)[None]
    p = torch.as_tensor(pts)[None]
    ref = box_sdf(pts, half)
    cm = mesh.ClusteredMesh(v, f, leaf=8)
    r = cm.query(p, verts, k=4, chunk=256)
    sdf = torch.where(r["winding"].sum(-1) > 0.5, -r["distance"], r["distance"])[0].numpy()
    np.testing.assert_allclose(sdf, ref, atol=1e-12)
    # the brute-force references agree too
    w = mesh.winding_number_brute(p, verts, torch.as_tensor(f), chunk=128)[0].numpy()
    d = mesh.distance_brute(p, verts, torch.as_tensor(f), chunk=128)[0].numpy()
    np.testing.assert_allclose(np.where(w > 0.5, -d, d), ref, atol=1e-12)
    np.testing.assert_allclose(w, (ref < 0).astype(float), atol=1e-9)


def test_sphere_sdf_and_winding_float32():
    v, f = icosphere(4)
    r0 = 0.1
    v = v * r0
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(2000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = np.concatenate([rng.uniform(0.0, 0.2, 1000), r0 + rng.normal(0, 0.003, 1000)])
    pts = dirs * radii[:, None]
    cm = mesh.ClusteredMesh(v, f, leaf=32)
    r = cm.query(torch.as_tensor(pts, dtype=torch.float32)[None], torch.as_tensor(v, dtype=torch.float32)[None])
    sdf = torch.where(r["winding"].sum(-1) > 0.5, -r["distance"], r["distance"])[0].double().numpy()
    ref = radii - r0
    # flat triangles sit at most r(1 - cos(edge angle)) inside the sphere: ~0.1 mm at level 4
    sagitta = r0 * (1 - np.cos(np.radians(4.0)))
    assert np.abs(sdf - ref).max() < sagitta
    clear = np.abs(ref) > sagitta
    assert (np.sign(sdf[clear]) == np.sign(ref[clear])).all()


def test_sampling_is_area_uniform():
    half = np.array([0.05, 0.08, 0.03])
    v, f = box_mesh(half, 4)
    verts = torch.as_tensor(v)[None]
    faces = torch.as_tensor(f)
    face, bary = mesh.sample_surface(verts, faces, 200_000, torch.Generator().manual_seed(0))
    p = mesh.interpolate(verts, faces, face, bary)[0].numpy()
    on_x = np.isclose(np.abs(p[:, 0]), half[0])
    area_x = 2 * (2 * half[1]) * (2 * half[2])
    total = 2 * 4 * (half[0] * half[1] + half[1] * half[2] + half[0] * half[2])
    assert abs(on_x.mean() - area_x / total) < 0.005
    assert (bary >= 0).all() and torch.allclose(bary.sum(-1), torch.ones(1, 200_000, dtype=bary.dtype))

