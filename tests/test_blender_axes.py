"""Backend <-> Blender axis conversion (imhead_blender/axes.py is bpy-free, so no Blender is needed)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "imhead_axes", Path(__file__).resolve().parents[1] / "imhead_blender" / "axes.py")
assert _spec is not None and _spec.loader is not None
axes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(axes)


def test_face_direction_and_up_axis():
    # The backend's face direction (+Z) must become Blender's -Y, its up (+Y) Blender's +Z.
    np.testing.assert_array_equal(axes.backend_to_blender(np.array([0.0, 0.0, 1.0])), [0.0, -1.0, 0.0])
    np.testing.assert_array_equal(axes.backend_to_blender(np.array([0.0, 1.0, 0.0])), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(axes.backend_to_blender(np.array([1.0, 0.0, 0.0])), [1.0, 0.0, 0.0])


def test_matches_matrix_is_a_rotation_and_round_trips():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(100, 3))
    np.testing.assert_allclose(axes.backend_to_blender(p), p @ axes.BACKEND_TO_BLENDER.T, rtol=1e-6, atol=1e-6)
    assert np.linalg.det(axes.BACKEND_TO_BLENDER) == pytest.approx(1.0)  # winding preserved
    np.testing.assert_allclose(axes.blender_to_backend(axes.backend_to_blender(p)), p, rtol=1e-6, atol=1e-6)
    assert axes.backend_to_blender(p).dtype == np.float32


def test_batched_shapes_are_kept():
    p = np.zeros((4, 5, 3))
    assert axes.backend_to_blender(p).shape == (4, 5, 3)


@pytest.mark.parametrize("shape", [(), (3, 2), (4,)])
def test_rejects_non_vectors(shape):
    with pytest.raises(ValueError, match="3-vectors"):
        axes.backend_to_blender(np.zeros(shape))


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_fit_overlay_matrix_maps_the_head_back_onto_the_input():
    # The fit found x_model = s R x_in + t for x_in = blender_to_backend(p); the head shows
    # q = backend_to_blender(x_model) and its matrix must take q back to the input's local p.
    rng = np.random.default_rng(1)
    s, r, t = 3.7, _rotation(rng), rng.normal(size=3)
    p = rng.normal(size=(50, 3))
    x_model = s * axes.blender_to_backend(p).astype(np.float64) @ r.T + t
    q = axes.backend_to_blender(x_model).astype(np.float64)
    m = axes.similarity_to_object_matrix(s, r, t)
    back = q @ m[:3, :3].T + m[:3, 3]
    np.testing.assert_allclose(back, p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_fit_overlay_matrix_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        axes.similarity_to_object_matrix(scale, np.eye(3), np.zeros(3))
