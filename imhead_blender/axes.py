"""Axis conversion between the backend frame and Blender's, kept free of bpy so it is unit-testable.

Backend: metres, +Y up, face toward +Z (glTF). Blender: Z up, a character faces -Y.
(x, y, z)_backend -> (x, -z, y)_blender, a proper rotation (det +1), so face winding is preserved.
"""

import numpy as np

# Row-vector form: v_blender = v_backend @ BACKEND_TO_BLENDER.T
BACKEND_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=np.float64)


def backend_to_blender(points: np.ndarray) -> np.ndarray:
    """(..., 3) backend coordinates -> Blender coordinates, float32."""
    p = _check(points)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1).astype(np.float32)


def blender_to_backend(points: np.ndarray) -> np.ndarray:
    """(..., 3) Blender coordinates -> backend coordinates, float32 (inverse of backend_to_blender)."""
    p = _check(points)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1).astype(np.float32)


def _check(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points)
    if p.ndim == 0 or p.shape[-1] != 3:
        raise ValueError(f"expected an array of 3-vectors, got shape {p.shape}")
    return p
