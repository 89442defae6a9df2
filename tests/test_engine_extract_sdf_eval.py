"""engine/sdf_eval.HeadSdf (extraction's network evaluation) against the model's own SDF."""

import pytest
import torch

from backend.engine.sdf_eval import HeadSdf, fold_first_layer
from backend.model.encoding import positional_encoding
from backend.weights import load_model


@pytest.fixture(scope="module")
def head():
    model = load_model(device="cpu").model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        zr, k = model.decode(torch.randn(1, 256, generator=g) * 0.05)
    # points around the head: the anchors' neighbourhoods and the box
    x = torch.cat([k[0][torch.randint(39, (3000,), generator=g)] + 0.02 * torch.randn(3000, 3, generator=g),
                   torch.rand(1000, 3, generator=g) * torch.tensor([0.32, 0.40, 0.30])
                   - torch.tensor([0.16, 0.22, 0.13])])
    return model, zr, k, x


def test_dense_is_the_models_all_region_sdf(head):
    model, zr, k, x = head
    with torch.no_grad():
        ref = model.sdf(x[None], zr, k)[0]
    out = HeadSdf(model, zr, k, mode="dense")(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-6  # metres: float32 rounding only


def test_folded_first_layer_is_each_regions_own(head):
    """fold_first_layer: the shared encoding of x through the folded weights gives every region's first-layer
    pre-activations on its own flipped, anchor-relative encoding (float64: the identity itself, to rounding)."""
    model, zr, k, x = head
    m = model.double()
    try:
        b1 = torch.einsum("rz,rzh->rh", zr[0].double(), m.loc_wz[m.slot]) + m.loc_b[m.slot]
        first = fold_first_layer(m, k[0].double(), b1)
        xd = x.double()
        shared = positional_encoding(xd, m.cfg.pe_freqs, m.cfg.pe_scale)
        for r in range(39):
            own = positional_encoding((xd - k[0, r].double()) * m.flip[r], m.cfg.pe_freqs, m.cfg.pe_scale)
            ref = own @ m.loc_wx[m.slot[r]] + b1[r]
            folded = shared @ first.w[r].double() + first.b[r].double()
            # the folded weights come out float32: their rounding only (3.5e-8 of the largest value measured)
            assert (folded - ref).abs().max() < 1e-6 * ref.abs().max()
    finally:
        model.float()


def test_sparse_leaves_out_at_most_the_tolerance(head):
    model, zr, k, x = head
    with torch.no_grad():
        ref = model.sdf(x[None], zr, k)[0]
        w = model.blend_weights(x[None], k)[0]
    fn = HeadSdf(model, zr, k, mode="sparse", drop_tol=1e-4)
    out = fn(x)
    assert 0 < fn.max_dropped <= 1e-4
    assert fn.regions_evaluated < 39 * len(x)
    assert (out - ref).abs().max() < 5e-5  # ~10 um measured on the trained model
    # With no tolerance every region with any weight is kept: the full field.
    exact = HeadSdf(model, zr, k, mode="sparse", drop_tol=0.0)(x)
    assert (exact - ref).abs().max() < 1e-6
    # A point's kept regions are its heaviest ones.
    assert fn.regions_evaluated >= len(x) * 1 and (w.max(1).values > 0).all()


def test_half_precision_is_exact_near_zero(head):
    """float16 hidden layers (the CUDA default) move values by micrometres; every value within exact_below of
    zero is recomputed in float32, so those values and all signs are the float32 field's."""
    model, zr, k, x = head
    ref = HeadSdf(model, zr, k, mode="dense")(x)
    fn = HeadSdf(model, zr, k, mode="dense", exact_below=5e-4, hidden_dtype=torch.float16)
    out = fn(x)
    err = (out - ref).abs()
    assert err.max() < 1e-4 and 0 < fn.exact_points < len(x)
    near = ref.abs() < 4e-4
    assert near.any() and err[near].max() < 1e-6
    assert (torch.sign(out) == torch.sign(ref)).all()
    with pytest.raises(ValueError):
        HeadSdf(model, zr, k, mode="sparse", hidden_dtype=torch.float16)


def test_bad_mode(head):
    model, zr, k, _ = head
    with pytest.raises(ValueError):
        HeadSdf(model, zr, k, mode="topk")


@pytest.mark.parametrize("device_mode", ["sparse", "dense"])
def test_session_mesh_matches_dense_reference(device_mode):
    """Apples to apples: generate's extraction (small pieces dropped) against the dense float32 all-39
    reference with the same clean-up: every vertex within 0.1 voxel both ways, same sign at every point the
    sparse path evaluated."""
    import numpy as np
    from scipy.spatial import cKDTree

    from backend.engine.extract import extract_dense
    from backend.engine.head import HeadSpec
    from backend.engine.session import Session

    session = Session(device="cpu")
    session.extract_mode = device_mode
    _, zr, k = session.decode(HeadSpec(session.sample_identity(2)))
    samples = []
    mesh, stats, dropped = session.canonical_mesh(zr, k, 40, samples=samples)
    ref, volume = extract_dense(lambda x: session.model.sdf(x[None], zr, k)[0], 40)
    h = stats.voxel
    assert len(mesh.faces) > 1000
    assert cKDTree(ref.vertices).query(mesh.vertices)[0].max() < 0.1 * h
    assert cKDTree(mesh.vertices).query(ref.vertices)[0].max() < 0.1 * h
    idx = torch.cat([s[0] for s in samples]).numpy()
    val = torch.cat([s[1] for s in samples]).numpy()
    inside = (idx < np.array(volume.shape)).all(axis=1)
    assert np.array_equal(np.sign(volume[tuple(idx[inside].T)]), np.sign(val[inside]))
    assert stats.points_evaluated < 0.5 * stats.dense_points


def test_threaded_evaluation_gives_the_values_and_counts_of_one_call(head):
    """extract_grid._evaluate runs CPU chunks on parallel threads: every point's value (to the rounding of the
    products, whose blocking depends on the row count), the counters and the largest left-out mass are those
    of one call over all points."""
    from backend.engine.extract_grid import _evaluate

    model, zr, k, x = head
    one = HeadSdf(model, zr, k, mode="sparse", drop_tol=1e-4, exact_below=2e-4)
    ref = one(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        many = HeadSdf(model, zr, k, mode="sparse", drop_tol=1e-4, exact_below=2e-4)
        out = _evaluate(many, x, chunk=300)  # 14 chunks on two threads
    finally:
        torch.set_num_threads(threads)
    # Rounding: the row blocking (and the CPU's kernels) may move a value by its last bit; two float32 ulps of
    # the largest value allow that and nothing more.
    assert (out - ref).abs().max() <= 2 * torch.finfo(torch.float32).eps * ref.abs().max()
    assert (many.regions_evaluated, many.exact_points, many.max_dropped) == (
        one.regions_evaluated, one.exact_points, one.max_dropped)
