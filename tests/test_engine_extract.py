"""Sparse coarse-to-fine extraction against the dense float32 reference on analytic SDFs."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from backend import errors
from backend.data.topology import signed_volume
from backend.engine.extract import CoarseSdf, extract_dense, extract_mesh, make_grid, remove_small_components, Mesh

C = torch.tensor([0.0, -0.02, 0.02])


def sphere(p):
    return (p - C).norm(dim=-1) - 0.1


def torus(p):
    q = p - C
    ring = torch.stack([torch.hypot(q[:, 0], q[:, 2]) - 0.09, q[:, 1]], -1)
    return ring.norm(dim=-1) - 0.03


def box(p):
    q = (p - C).abs() - torch.tensor([0.0913, 0.1217, 0.0709])  # faces off the lattice planes
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)


def spheres(p):
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.06, 0.05, 0.03], [-0.07, -0.08, 0.05], [0.12, -0.15, -0.09]])
    radii = torch.tensor([0.09, 0.06, 0.05, 0.012])  # the last one is a small separate piece
    return ((p[:, None, :] - centres).norm(dim=-1) - radii).min(dim=1).values


def steep_sphere(p):  # |grad| = 1.7: needs L >= 1.7, exercises the observed-Lipschitz retry
    return 1.7 * sphere(p)


@pytest.mark.parametrize("fn", [sphere, torus, box, spheres, steep_sphere])
@pytest.mark.parametrize("resolution", [48, 96])
def test_sparse_matches_dense(fn, resolution):
    samples = []
    fast, stats = extract_mesh(fn, resolution, min_component=0.0, samples=samples)
    dense, volume = extract_dense(fn, resolution, min_component=0.0)
    h = stats.voxel
    assert len(fast.faces) > 100 and len(dense.faces) > 100
    # Same surface: every vertex of each mesh within 0.1 voxel of the other's.
    assert cKDTree(dense.vertices).query(fast.vertices)[0].max() < 0.1 * h
    assert cKDTree(fast.vertices).query(dense.vertices)[0].max() < 0.1 * h
    assert len(fast.faces) == len(dense.faces)
    # Same sign wherever the fast path evaluated (points inside the unpadded dense lattice).
    idx = torch.cat([s[0] for s in samples]).numpy()
    val = torch.cat([s[1] for s in samples]).numpy()
    inside = (idx < np.array(volume.shape)).all(axis=1)
    ref = volume[tuple(idx[inside].T)]
    assert np.array_equal(np.sign(ref), np.sign(val[inside]))
    assert stats.points_evaluated < stats.dense_points
    # Outward winding: positive enclosed volume; it agrees with the reference up to the triangulation of
    # an ambiguous cell or two (same vertices, the classic table and scikit-image may split them differently).
    v_fast = signed_volume(fast.vertices, fast.faces)
    assert v_fast > 0
    assert abs(v_fast - signed_volume(dense.vertices, dense.faces)) < 2 * h**3
    if fn is steep_sphere:
        assert stats.lipschitz >= 1.7


@pytest.mark.parametrize("fn", [sphere, torus, spheres])
def test_coarse_levels_with_an_approximate_field(fn):
    # A coarse field off by up to `error` (sign flips included) wherever its value is below exact_above, exact
    # elsewhere (HeadSdf's own value is its approximate one above its exact threshold): the mesh must be exact.
    error, exact_above = 1.5e-3, 3e-3

    def noisy(p):
        v = fn(p)
        off = v + error * torch.sin(997.0 * p.sum(dim=-1) + 3.0)  # deterministic, within error
        return torch.where(off.abs() < exact_above, off, v)

    samples = []
    ref, ref_stats = extract_mesh(fn, 96, min_component=0.0)
    got, stats = extract_mesh(fn, 96, min_component=0.0, samples=samples,
                              coarse=CoarseSdf(noisy, error, exact_above))
    assert np.array_equal(got.faces, ref.faces) and np.array_equal(got.vertices, ref.vertices)
    idx = torch.cat([s[0] for s in samples])
    val = torch.cat([s[1] for s in samples])
    pts = torch.tensor(make_grid(96).origin, dtype=torch.float64) + idx.double() * stats.voxel
    assert torch.equal(torch.sign(val), torch.sign(fn(pts.float())))  # every value taken as a sign is right
    # without the error margin the same coarse field loses parts of the surface
    bad, _ = extract_mesh(fn, 96, min_component=0.0, coarse=CoarseSdf(noisy, 0.0, 0.0))
    assert not np.array_equal(bad.vertices, ref.vertices)


def test_band_is_sparse_at_high_resolution():
    _, stats = extract_mesh(sphere, 256)
    assert stats.points_evaluated < 0.1 * stats.dense_points


def test_small_pieces_removed():
    full, _ = extract_mesh(spheres, 64, min_component=0.0)
    cleaned, stats = extract_mesh(spheres, 64, min_component=0.05)
    assert stats.components_removed == 1
    assert len(cleaned.faces) < len(full.faces)
    # The kept part is what remains after dropping the small sphere (all far from its centre).
    small = np.array([0.12, -0.15, -0.09]) + C.numpy()
    assert np.linalg.norm(cleaned.vertices - small, axis=1).min() > 0.02


def test_remove_small_components_reindexes():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5], [6, 5, 5], [5, 6, 5], [9, 9, 9]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 1], [0, 1, 2], [3, 4, 5]], np.int32)
    out, removed = remove_small_components(Mesh(v, f), 0.5)
    assert removed == 1 and len(out.vertices) == 3 and out.faces.max() == 2


def test_small_piece_touching_the_main_surface_is_kept():
    # A one-face piece 0.5 from the big piece (an ambiguous-cell split) stays; one 5 away (a floater) goes.
    big = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    near = np.array([[0, 0, 0.5], [1, 0, 0.5], [0, 1, 0.5]], np.float32)
    far = near + 5
    v = np.concatenate([big, near, far])
    f = np.array([[0, 1, 2], [1, 3, 2], [0, 2, 1], [1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32)
    out, removed = remove_small_components(Mesh(v, f), 0.5, touch=1.0)
    assert removed == 1 and len(out.faces) == 5 and np.abs(out.vertices - 5.5).min() > 1
    assert remove_small_components(Mesh(v, f), 0.5)[1] == 2


def test_grid_resolution_is_cells_along_longest_side():
    g = make_grid(100)
    assert g.cells[1] == 100 and g.voxel == pytest.approx(0.004)


@pytest.mark.parametrize("bad", [15, 1025, 0, -3, 64.0, "64", True, None])
def test_bad_resolution(bad):
    with pytest.raises(errors.InvalidInput):
        extract_mesh(sphere, bad)


def test_nan_sdf_is_reported():
    with pytest.raises(errors.BackendError):
        extract_mesh(lambda p: torch.full((p.shape[0],), float("nan")), 32)


@pytest.mark.parametrize("resolution", [16, 20, 31])
def test_low_resolutions_without_descent(resolution):
    fast, _ = extract_mesh(sphere, resolution, min_component=0.0)
    dense, _ = extract_dense(sphere, resolution, min_component=0.0)
    assert len(fast.faces) == len(dense.faces) > 0


def test_dense_reference_drops_the_same_small_pieces():
    """extract_dense and extract_mesh share the default clean-up, so comparing them is apples to apples."""
    fast, stats = extract_mesh(spheres, 64, min_component=0.05)
    dense, _ = extract_dense(spheres, 64, min_component=0.05)
    assert stats.components_removed == 1
    assert cKDTree(dense.vertices).query(fast.vertices)[0].max() < 0.1 * stats.voxel
    assert cKDTree(fast.vertices).query(dense.vertices)[0].max() < 0.1 * stats.voxel
