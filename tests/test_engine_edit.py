"""Region editing semantics and HeadSpec JSON read/write with validation."""

import json

import numpy as np
import pytest

from backend import errors
from backend.engine.edit import RegionStats, apply_ops, effective_codes
from backend.engine.head import HeadSpec, load_head, save_head
from backend.engine.session import Session


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def heads(session):
    return HeadSpec(session.sample_identity(1)), HeadSpec(session.sample_identity(2))


def run(session, head, ops):
    return apply_ops(head, ops, session.decode_regions, session.region_names, session.region_stats, session.parse_head)


def codes(session, head):
    return effective_codes(head, session.decode_regions, session.region_names)


def test_swap_blend_set_reset(session):
    a, b = heads(session)
    ca, cb = codes(session, a), codes(session, b)
    names = session.region_names
    j = names.index("nose tip")
    swapped = run(session, a, [{"op": "swap", "regions": ["nose tip", "chin"], "other": b.to_dict()}])
    cs = codes(session, swapped)
    np.testing.assert_allclose(cs[j], cb[j], rtol=1e-6)
    np.testing.assert_allclose(cs[names.index("chin")], cb[names.index("chin")], rtol=1e-6)
    others = [i for i in range(39) if names[i] not in ("nose tip", "chin")]
    np.testing.assert_array_equal(cs[others], ca[others])
    assert np.array_equal(swapped.identity, a.identity)

    half = codes(session, run(session, a, [{"op": "blend", "regions": ["nose tip"], "other": b.to_dict(), "t": 0.25}]))
    np.testing.assert_allclose(half[j], 0.75 * ca[j] + 0.25 * cb[j], rtol=1e-5, atol=1e-7)

    code = list(np.linspace(-1, 1, 32))
    s = run(session, a, [{"op": "set", "codes": {"chin": code}}, {"op": "reset", "regions": ["chin"]},
                         {"op": "set", "codes": {"nose tip": code}}])
    assert list(s.region_overrides) == ["nose tip"]
    np.testing.assert_allclose(codes(session, s)[j], code, rtol=1e-6)
    # The input head is untouched.
    assert a.region_overrides == {}


def test_randomise_is_seeded_and_pca_sliders_roundtrip(session):
    a, _ = heads(session)
    r1 = run(session, a, [{"op": "randomise", "regions": "all", "seed": 7, "scale": 1.0}])
    r2 = run(session, a, [{"op": "randomise", "regions": "all", "seed": 7, "scale": 1.0}])
    assert len(r1.region_overrides) == 39
    for n in r1.region_overrides:
        np.testing.assert_array_equal(r1.region_overrides[n], r2.region_overrides[n])
    p = run(session, a, [{"op": "pca", "region": "left cheek", "values": [1.5, -2.0]}])
    sl = session.sliders(p)["left cheek"]
    before = session.sliders(a)["left cheek"]
    np.testing.assert_allclose(sl[:2], [1.5, -2.0], atol=1e-4)
    np.testing.assert_allclose(sl[2:], before[2:], atol=1e-4)


def test_region_stats_coords_inverse():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    st = RegionStats(rng.standard_normal((39, 32)), np.broadcast_to(q.T, (39, 32, 32)), rng.uniform(0.1, 2, (39, 32)))
    c = rng.standard_normal(32)
    np.testing.assert_allclose(st.code(4, st.coords(4, c)), c, atol=1e-10)


@pytest.mark.parametrize("ops", [
    [], "swap", [{"op": "explode"}], [{"op": "swap", "regions": ["no such region"], "other": None}],
    [{"op": "swap", "regions": ["chin"]}], [{"op": "blend", "regions": ["chin"], "other": "x", "t": 0.5}],
    [{"op": "blend", "regions": ["chin"], "t": 1.5}], [{"op": "pca", "region": "chin", "values": [99.0]}],
    [{"op": "pca", "region": "chin", "values": [0.0] * 33}], [{"op": "set", "codes": {"chin": [0.0] * 31}}],
    [{"op": "set", "codes": {"chin": [float("inf")] * 32}}], [{"op": "randomise", "regions": [], "seed": 1}],
    [{"op": "reset", "regions": ["chin"], "extra": 1}],
])
def test_bad_ops(session, ops):
    a, b = heads(session)
    for op in ops if isinstance(ops, list) else []:
        if isinstance(op, dict) and op.get("other") is None and op.get("op") in ("blend",) and "other" not in op:
            op["other"] = b.to_dict()
    with pytest.raises(errors.InvalidInput):
        run(session, a, ops)


def test_head_json_roundtrip(session, tmp_path):
    a, _ = heads(session)
    a.region_overrides["chin"] = np.arange(32, dtype=np.float32)
    a.expression["jawOpen"] = 0.5
    path = tmp_path / "h.json"
    save_head(a, path)
    back = load_head(path, session.region_names, session.expression_names)
    assert np.array_equal(back.identity, a.identity)
    assert np.array_equal(back.region_overrides["chin"], a.region_overrides["chin"])
    assert back.expression == {"jawOpen": 0.5}
    data = json.loads(path.read_text())
    for broken in ({**data, "format": "other"}, {**data, "identity": data["identity"][:-1]},
                   {**data, "expression": {"jawOpen": "x"}}, {**data, "expression": {"jawOpen": True}},
                   {**data, "extra": 1}, [1, 2]):
        path.write_text(json.dumps(broken))
        with pytest.raises(errors.InvalidInput):
            load_head(path, session.region_names, session.expression_names)
    path.write_text("{not json")
    with pytest.raises(errors.InvalidInput):
        load_head(path, session.region_names, session.expression_names)


def test_session_edit_returns_head_mesh_and_sliders(session):
    a, b = heads(session)
    out, mesh = session.edit({"head": a.to_dict(), "resolution": 20,
                              "ops": [{"op": "swap", "regions": ["chin"], "other": b.to_dict()}]}, {})
    assert "chin" in out["head"]["region_overrides"] and len(out["sliders"]) == 39
    assert mesh["faces"].shape[1] == 3 and len(mesh["region"]) == len(mesh["vertices"])
