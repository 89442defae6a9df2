"""Engine session on the shipped (or, without weights, the geometric-init) network."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from backend import errors
from backend.engine.extract import extract_dense
from backend.engine.session import Session


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def test_info(session):
    info = session.info()
    assert info["torch_device"] == "cpu"
    assert isinstance(info["trained"], bool)


def test_generate_matches_dense_full_network(session):
    params, arrays = session.generate({"seed": 3, "resolution": 40}, {})
    v, f = arrays["vertices"], arrays["faces"]
    assert v.dtype == np.float32 and f.dtype == np.int32 and v.shape[1] == 3 and f.shape[1] == 3
    assert f.max() < len(v)
    stats = params["stats"]
    assert stats["max_dropped_blend_weight"] <= 1e-3
    # Reference: every lattice point through all 39 local networks, scikit-image marching cubes.
    _, zr, k = session.decode_params(params["head"])
    ref, _ = extract_dense(lambda x: session.model.sdf(x[None], zr, k)[0], 40)
    h = stats["voxel_m"]
    assert cKDTree(ref.vertices).query(v)[0].max() < 0.1 * h
    assert cKDTree(v).query(ref.vertices)[0].max() < 0.1 * h


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
