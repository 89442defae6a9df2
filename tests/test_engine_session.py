"""Engine session on the shipped (or, without weights, the geometric-init) network."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from backend import errors, replies
from backend.engine.extract import extract_dense, extract_mesh
from backend.engine.session import Session
from backend.engine.tuning import EXTRACT_DROP_TOL, LIPSCHITZ, POINT_DROP_TOL
from backend.engine.template import MeshIndex


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def test_info(session):
    info = session.info()
    assert info["torch_device"] == "cpu"
    assert isinstance(info["trained"], bool)
    assert len(info["regions"]) == 39 and len(info["expressions"]) == 53
    assert {"id", "name", "mirror"} <= set(info["regions"][0])


GEN_RESOLUTION = 56


@pytest.fixture(scope="module")
def generated(session):
    # 56: at 40 (1 cm voxels) the trained head's lips, nostrils and ears are thinner than a cell, and 1.4% of
    # the mesh's vertex normals there disagree with the SDF gradient (0.6% at 56)
    return session.generate({"seed": 3, "resolution": GEN_RESOLUTION}, {})


def test_generate_attributes(session, generated):
    params, arrays = generated
    replies.HeadReply.from_dict(params, arrays)  # the typed reply the add-on checks
    n = len(arrays["vertices"])
    shapes = {"vertices": (n, 3), "canonical": (n, 3), "template": (n, 3), "normals": (n, 3), "uv": (n, 2),
              "region": (n,)}
    for name, shape in shapes.items():
        assert arrays[name].shape == shape, name
        assert arrays[name].dtype == (np.int32 if name == "region" else np.float32), name
    assert arrays["region"].min() >= 0 and arrays["region"].max() < 39
    np.testing.assert_allclose(np.linalg.norm(arrays["normals"], axis=1), 1.0, atol=1e-5)
    # Outward: the normal agrees with the face normals of the extracted (outward-wound) mesh.
    v, f = arrays["vertices"].astype(np.float64), arrays["faces"]
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    vn = np.zeros_like(v)
    for i in range(3):
        np.add.at(vn, f[:, i], fn)
    assert np.mean(np.sum(vn * arrays["normals"], axis=1) > 0) > 0.99
    lo, hi = session.atlas.uv.min((0, 1)), session.atlas.uv.max((0, 1))  # ICT UVs span two tiles in u
    assert (arrays["uv"] >= lo - 1e-6).all() and (arrays["uv"] <= hi + 1e-6).all()
    # Vertices are linear interpolations of the SDF along cell edges: within a fraction of a voxel of zero.
    assert params["stats"]["vertex_abs_sdf_p99_m"] < 0.2 * params["stats"]["voxel_m"]


def test_vertex_attributes_match_all_regions(session, generated):
    """The attribute pass evaluates each vertex with its heaviest local networks only: SDF, normals and template
    positions agree with all 39 networks, and the normals are the SDF's gradient (central differences)."""
    params, arrays = generated
    assert params["stats"]["vertex_max_dropped_blend_weight"] <= POINT_DROP_TOL["cpu"]
    _, zr, k = session.decode_params(params["head"])
    x = arrays["canonical"]
    sdf, grad, tmpl, dropped = session.sdf_grad_template(x, zr, k)
    session.topk, saved = None, session.topk
    try:
        sdf39, grad39, tmpl39, dropped39 = session.sdf_grad_template(x, zr, k)
    finally:
        session.topk = saved
    assert dropped == params["stats"]["vertex_max_dropped_blend_weight"] and dropped39 == 0.0
    # measured here (POINT_DROP_TOL 1e-4): 14.3 um, 4.5 um, 0.39 degrees
    assert np.abs(sdf - sdf39).max() < 2e-5
    assert np.linalg.norm(tmpl - tmpl39, axis=1).max() < 6e-6
    cos = (grad * grad39).sum(1) / (np.linalg.norm(grad, axis=1) * np.linalg.norm(grad39, axis=1))
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.5
    np.testing.assert_allclose(arrays["normals"], grad / np.linalg.norm(grad, axis=1, keepdims=True), atol=1e-6)
    h, sub = 1e-4, x[::50].astype(np.float64)
    sdf_at = lambda p: session.vertex_sdf(p.astype(np.float32), zr, k).double().numpy()  # noqa: E731
    fd = np.stack([(sdf_at(sub + h * e) - sdf_at(sub - h * e)) / (2 * h) for e in np.eye(3)], 1)
    assert np.abs(fd - grad[::50]).max() < 5e-3  # measured 5e-4 (float32 differences at 0.1 mm, curvature)


@pytest.mark.parametrize("all_regions", [False, True])
def test_reverse_pass_matches_autograd(session, generated, all_regions):
    """PointField.field_grad's hand-written reverse pass (local networks, positional encoding, blend weights,
    prior sphere) gives autograd's gradient of PointField.field, with the same SDF and features; also at points
    on an anchor."""
    params, arrays = generated
    _, zr, k = session.decode_params(params["head"])
    x = torch.cat([torch.as_tensor(arrays["canonical"][::3]), k[0, :2]])
    session.topk, saved = (None if all_regions else session.topk), session.topk
    try:
        field = session.point_field(zr, k, POINT_DROP_TOL["cpu"])
        sdf, grad, feat, dropped = field.field_grad(x)
        xg = x.clone().requires_grad_(True)
        sdf_ref, feat_ref, dropped_ref = field.field(xg)
        (grad_ref,) = torch.autograd.grad(sdf_ref.sum(), xg)
    finally:
        session.topk = saved
    assert torch.equal(sdf, sdf_ref.detach()) and torch.equal(feat, feat_ref.detach())
    assert dropped == dropped_ref and (dropped == 0.0) == all_regions and dropped <= POINT_DROP_TOL["cpu"]
    assert torch.isfinite(grad).all()
    assert (grad - grad_ref).norm(dim=1).max() < 2e-5  # float32 rounding; measured <= 2e-6 on |grad| ~ 1


def test_dense_attribute_pass_matches_the_region_loop(session, generated):
    """On a GPU, points through every region run as batched products over the region axis
    (sdf_eval.dense_local_features and its batched reverse); here on CPU against the per-region loop and
    autograd, also at points on an anchor."""
    params, arrays = generated
    _, zr, k = session.decode_params(params["head"])
    x = torch.cat([torch.as_tensor(arrays["canonical"][::3]), k[0, :2]])
    saved = session.topk, session.dense_attributes
    session.topk = None
    try:
        session.dense_attributes = False
        sdf_l, grad_l, feat_l, _ = session.point_field(zr, k, None).field_grad(x)
        session.dense_attributes = True
        sdf, grad, feat, _ = session.point_field(zr, k, None).field_grad(x)
        xg = x.clone().requires_grad_(True)
        sdf_ref, _, _ = session.point_field(zr, k, None).field(xg)
        (grad_ref,) = torch.autograd.grad(sdf_ref.sum(), xg)
    finally:
        session.topk, session.dense_attributes = saved
    assert (sdf - sdf_l).abs().max() < 1e-7 and (feat - feat_l).abs().max() < 1e-5  # float rounding
    assert torch.isfinite(grad).all()
    assert (grad - grad_l).norm(dim=1).max() < 2e-5 and (grad - grad_ref).norm(dim=1).max() < 2e-5


def test_vertex_attributes_do_not_import_sympy(run_python):
    """autograd.grad with a tensor of output gradients imports torch.fx's symbolic shapes and sympy (~0.3 s of a
    cold start); the attribute pass differentiates a scalar."""
    code = (
        "import sys\n"
        "from backend.engine.head import HeadSpec\n"
        "from backend.engine.session import Session\n"
        "s = Session(device='cpu')\n"
        "_, zr, k = s.decode(HeadSpec(s.sample_identity(0)))\n"
        "s.sdf_grad_template(s.atlas.vertices[:2000], zr, k)\n"
        "print('sympy' in sys.modules)\n"
    )
    assert run_python(code).strip() == "False"


def test_deform_identity_for_neutral_and_validation(session, generated):
    params, arrays = generated
    canon = arrays["canonical"][:500]
    expr = np.zeros((3, 53), np.float32)
    out, res = session.deform({"head": params["head"]}, {"canonical": canon, "expressions": expr})
    replies.DeformReply.from_dict(out, res)
    assert res["vertices"].shape == (3, 500, 3) and res["residual"].shape == (3, 500)
    assert res["converged"].dtype == np.uint8 and res["converged"].all()
    np.testing.assert_allclose(res["vertices"][1], canon, atol=1e-6)
    assert out["non_converged"] == 0
    bad = [
        ({"canonical": canon, "expressions": np.zeros((3, 52), np.float32)}, {}),
        ({"canonical": canon[:, :2], "expressions": expr}, {}),
        ({"canonical": canon.astype(np.int32), "expressions": expr}, {}),
        ({"canonical": np.full((4, 3), np.nan, np.float32), "expressions": expr}, {}),
        ({"canonical": canon[:0], "expressions": expr}, {}),
        ({"expressions": expr}, {}),
        ({"canonical": canon, "expressions": expr + 5}, {}),
        ({"canonical": canon, "expressions": expr}, {"exact_residual": "yes"}),
    ]
    for arr, extra in bad:
        with pytest.raises(errors.InvalidInput):
            session.deform({"head": params["head"]} | extra, arr)


def test_generate_matches_dense_full_network(session, generated):
    params, arrays = generated
    v, f = arrays["vertices"], arrays["faces"]
    assert v.dtype == np.float32 and f.dtype == np.int32 and v.shape[1] == 3 and f.shape[1] == 3
    assert f.max() < len(v)
    stats = params["stats"]
    assert stats["max_dropped_blend_weight"] <= EXTRACT_DROP_TOL
    # Reference: every lattice point through all 39 local networks, scikit-image marching cubes. Small
    # pieces are kept on both sides here (generate drops them; skimage's mesh connects pieces differently).
    _, zr, k = session.decode_params(params["head"])
    ref, _ = extract_dense(lambda x: session.model.sdf(x[None], zr, k)[0], GEN_RESOLUTION, min_component=0.0)
    fast, _ = extract_mesh(session.sdf_fn(zr, k), GEN_RESOLUTION, lipschitz=LIPSCHITZ, min_component=0.0)
    h = stats["voxel_m"]
    # generate's mesh lies on the reference; the vertices its cuts (open_surface) add lie on the extracted mesh's
    # edges: chords, within a cell of the reference surface
    kept = cKDTree(session.canonical_mesh(zr, k, GEN_RESOLUTION)[0].vertices).query(v)[0] == 0
    assert kept.mean() > 0.9
    assert cKDTree(ref.vertices).query(v[kept])[0].max() < 0.1 * h
    assert MeshIndex(ref.vertices, ref.faces).closest(v[~kept])[2].max() < h
    assert cKDTree(ref.vertices).query(fast.vertices)[0].max() < 0.1 * h
    assert cKDTree(fast.vertices).query(ref.vertices)[0].max() < 0.1 * h


def test_generate_is_deterministic(session):
    a = session.generate({"seed": 5, "resolution": 24}, {})
    b = session.generate({"head": a[0]["head"], "resolution": 24}, {})
    assert np.array_equal(a[1]["vertices"], b[1]["vertices"])


@pytest.mark.parametrize("params", [
    {"resolution": 1025}, {"resolution": 8}, {"resolution": 64.5}, {"seed": -1}, {"seed": "x"},
    {"bogus": 1}, {"head": {"format": "imhead-head/1", "identity": [0.0] * 255}},
    {"head": {"format": "imhead-head/1", "identity": [float("nan")] * 256}},
    {"head": {"format": "imhead-head/1", "identity": [0.0] * 256, "region_overrides": {"no_such_region": [0.0] * 32}}},
    {"head": {"format": "imhead-head/1", "identity": [0.0] * 256, "expression": {"no_such_expression": 1.0}}},
])
def test_generate_rejects_bad_input(session, params):
    with pytest.raises(errors.InvalidInput):
        session.generate(params, {})


def test_warm_up_builds_what_a_first_request_needs():
    fresh = Session(device="cpu")
    assert fresh._template_index is None
    fresh.warm_up()
    assert fresh._template_index is not None  # template index built
    out, arrays = fresh.generate({"seed": 1, "resolution": 32}, {})
    assert len(arrays["faces"]) > 0
