"""Point-to-surface metrics on cases with known answers: a mesh against itself, concentric spheres, and a
float64 brute force on small random meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.data import metrics
from test_data_sdf import icosphere


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine's 2 cores are shared: torch's 2 threads then wait on each other (backend/cpu.py)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_distance(points: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Float64 point-to-triangle distance, every point against every triangle (Ericson 5.1.5 by regions)."""
    p = points[:, None]                                  # (n,1,3)
    a, b, c = (verts[faces[:, i]][None] for i in range(3))  # (1,F,3)
    ab, ac, ap = b - a, c - a, p - a

    def dot(x, y):
        return (x * y).sum(-1)

    def seg(x, y):  # distance to segment x-y
        t = np.clip(dot(p - x, y - x) / np.maximum(dot(y - x, y - x), 1e-300), 0, 1)
        return np.linalg.norm(p - (x + t[..., None] * (y - x)), axis=-1)

    n = np.cross(ab, ac)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    h = dot(ap, n)
    q = p - h[..., None] * n                             # projection on the plane
    inside = ((dot(np.cross(b - a, q - a), n) >= 0) & (dot(np.cross(c - b, q - b), n) >= 0)
              & (dot(np.cross(a - c, q - c), n) >= 0))
    edge = np.minimum(np.minimum(seg(a, b), seg(b, c)), seg(c, a))
    return np.where(inside, np.abs(h), edge).min(1)


def test_mesh_against_itself_is_zero():
    v, f = icosphere(5)                                  # 20,480 triangles
    m = metrics.evaluate(v * 0.1, f, v * 0.1, f, n=200_000)
    assert m["chamfer_l1"] < 1e-4 and m["accuracy"] < 1e-4 and m["completeness"] < 1e-4
    assert m["f_score@1mm"] == 1.0 and m["normal_consistency"] > 1 - 1e-6
    assert m["n_pred"] == m["n_gt"] == 200_000


def test_against_float64_brute_force():
    rng = np.random.default_rng(3)
    for n_tri in (1, 7, 60):
        verts = rng.normal(size=(3 * n_tri, 3)) * 0.05 + rng.normal(size=3) * 0.02
        faces = rng.permutation(3 * n_tri).reshape(n_tri, 3)
        pts = np.concatenate([rng.normal(size=(400, 3)) * 0.05,                  # around the mesh
                              metrics.sample_mesh(verts, faces, 200, 1)[0],      # on it
                              rng.normal(size=(50, 3)) * 2.0])                   # far off
        d, normal = metrics.Surface(verts, faces).distance(pts)
        ref = brute_distance(pts, verts, faces)
        # float32 relative to the mesh's centre: rounding of ~1e-7 of the coordinates' size
        assert (np.abs(d - ref) <= 1e-6 * (0.1 + np.linalg.norm(pts, axis=1))).all()
        assert np.allclose(np.linalg.norm(normal, axis=1), 1.0)
    with pytest.raises(ValueError):
        metrics.Surface(verts, faces).distance(np.full((2, 3), np.nan))


def test_sphere_one_millimetre_off():
    v, f = icosphere(6)                                  # 81,920 triangles; sagitta ~ 4 micrometres at r = 0.1 m
    r, n = 0.100, 100_000
    m = metrics.evaluate(v * r, f, v * (r + 0.001), f, n=n)
    # corresponding triangles lie in parallel planes (r2 - r1) h apart, h the centre's distance to a unit face
    # (1 - 4e-5 at this level); a point's closest point is on its own scaled triangle or near it
    assert m["accuracy"] == pytest.approx(1.0, abs=1e-4)
    assert m["completeness"] == pytest.approx(1.0, abs=1e-4)
    assert m["chamfer_l1"] == pytest.approx(1.0, abs=1e-4)
    assert m["chamfer_l2"] == pytest.approx(1.0, abs=2e-4)
    assert m["f_score@2.5mm"] == 1.0 and m["f_score@5mm"] == 1.0
    assert m["normal_consistency"] > 1 - 1e-6
    far = metrics.evaluate(v * r, f, v * (r + 0.002), f, n=n)
    assert far["chamfer_l1"] == pytest.approx(2.0, abs=2e-4) and far["f_score@1mm"] == 0.0


def test_bad_input():
    v, f = icosphere(2)
    with pytest.raises(ValueError):
        metrics.evaluate(v, f + len(v), v, f)
    with pytest.raises(ValueError):
        metrics.evaluate(v[:, :2], f, v, f)
