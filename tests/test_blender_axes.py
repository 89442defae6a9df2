"""Backend <-> Blender axis conversion (imhead_blender/axes.py is bpy-free, so no Blender is needed)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "imhead_axes", Path(__file__).resolve().parents[1] / "imhead_blender" / "axes.py")
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
