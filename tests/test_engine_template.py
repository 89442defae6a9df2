"""Template queries: closest point, region labels and ICT UVs from template positions."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from backend.data.atlas import load_atlas
from backend.engine.template import MeshIndex, TemplateIndex, closest_point_on_triangles, seam_faces


@pytest.fixture(scope="module")
def index():
    return TemplateIndex(load_atlas())


def test_closest_point_on_triangles_matches_sampling():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(100, 3, generator=g, dtype=torch.float64)
    a, b, c = torch.randn(3, 100, 3, generator=g, dtype=torch.float64)
    bc = closest_point_on_triangles(q, a, b, c)
    assert (bc >= -1e-12).all() and torch.allclose(bc.sum(1), torch.ones(100, dtype=torch.float64))
    d = (bc[:, :1] * a + bc[:, 1:2] * b + bc[:, 2:] * c - q).norm(dim=1)
    s = torch.distributions.Dirichlet(torch.ones(3)).sample((20000,)).double()
    for i in range(100):
        dense = (s[:, :1] * a[i] + s[:, 1:2] * b[i] + s[:, 2:] * c[i] - q[i]).norm(dim=1).min()
        assert d[i] <= dense + 1e-12


def test_closest_agrees_with_brute_force(index):
    rng = np.random.default_rng(0)
    atlas = index.atlas
    p = atlas.vertices[rng.integers(0, len(atlas.vertices), 200)] + rng.normal(0, 0.002, (200, 3))
    _, _, d = index.closest(p)
    tri = torch.as_tensor(atlas.vertices[atlas.faces], dtype=torch.float64)
    pt = torch.as_tensor(p)
    bc = closest_point_on_triangles(pt[:, None], tri[None, :, 0], tri[None, :, 1], tri[None, :, 2])
    brute = ((bc[..., None] * tri[None]).sum(-2) - pt[:, None]).norm(dim=-1).min(1).values.numpy()
    assert np.all(d >= brute - 1e-6)
    assert np.percentile(d - brute, 99) < 1e-5 and np.max(d - brute) < 1e-4  # candidate search is local


def test_uv_and_region_on_the_template_itself(index):
    atlas = index.atlas
    centroids = atlas.vertices[atlas.faces].mean(1)
    uv, island = index.uv(centroids)
    np.testing.assert_allclose(uv, atlas.uv.mean(1), atol=1e-4)
    assert np.array_equal(island, index.face_island)
    assert np.array_equal(index.nearest_region(atlas.vertices), atlas.region)


def test_closest_in_chunks_on_threads_matches_one_chunk():
    """closest() splits the points into chunks on parallel threads: every row's answer is the one-chunk answer."""
    atlas = load_atlas()
    rng = np.random.default_rng(1)
    p = atlas.vertices[rng.integers(0, len(atlas.vertices), 3000)] + rng.normal(0, 0.01, (3000, 3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chunked = MeshIndex(atlas.vertices, atlas.faces).closest(p, chunk=700)
    finally:
        torch.set_num_threads(threads)
    whole = MeshIndex(atlas.vertices, atlas.faces).closest(p, chunk=len(p))
    for a, b in zip(chunked, whole):
        assert np.array_equal(a, b)
    face, bary, dist = MeshIndex(atlas.vertices, atlas.faces).closest(np.zeros((0, 3)))
    assert face.shape == (0,) and bary.shape == (0, 3) and dist.shape == (0,)


def test_nearest_region_reuses_the_closest_search(index):
    """After closest() on the same points, nearest_region reads the first candidate of its vertex search; on
    other points it searches itself: both are the nearest template vertex's region."""
    atlas = index.atlas
    tree = cKDTree(atlas.vertices.astype(np.float64))
    rng = np.random.default_rng(2)
    p = atlas.vertices[rng.integers(0, len(atlas.vertices), 2000)] + rng.normal(0, 0.01, (2000, 3))
    index.closest(p)
    assert np.array_equal(index.nearest_region(p), atlas.region[tree.query(p)[1]])
    assert np.array_equal(index.nearest_region(p[::-1]), atlas.region[tree.query(p[::-1])[1]])


def test_seam_faces_counts_mixed_islands():
    faces = np.array([[0, 1, 2], [1, 2, 3]])
    assert seam_faces(faces, np.array([0, 0, 0, 1])) == 1



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_closest_with_the_tests_on_a_gpu_matches_cpu():
    atlas = load_atlas()
    rng = np.random.default_rng(4)
    p = atlas.vertices[rng.integers(0, len(atlas.vertices), 20000)] + rng.normal(0, 0.004, (20000, 3))
    (f1, b1, d1), (f2, b2, d2) = (MeshIndex(atlas.vertices, atlas.faces, device=d).closest(p) for d in ("cpu", "cuda"))
    # the same candidates; a different face only where two are equally close (a shared edge: 0.4% on the H100)
    assert np.abs(d1 - d2).max() < 1e-6 and (f1 == f2).mean() > 0.99
    assert np.array_equal(TemplateIndex(atlas, "cuda").nearest_region(p), TemplateIndex(atlas).nearest_region(p))
