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


def similarity_to_object_matrix(scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 matrix placing a head built in Blender canonical axes over the object it was fitted to.

    The fit sent the object's local points turned into backend axes, x_in = blender_to_backend(p), and
    found x_model = scale * rotation @ x_in + translation. The head's local points are
    q = backend_to_blender(x_model); the returned M maps q back to the object's local p = M @ q, so
    head.matrix_world = fitted_object.matrix_world @ M overlays the two.
    """
    r = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64)
    if r.shape != (3, 3) or t.shape != (3,) or not np.isfinite(r).all() or not np.isfinite(t).all():
        raise ValueError("fit transform must be a 3x3 rotation and a 3-vector translation")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"fit scale must be positive, got {scale}")
    b = BACKEND_TO_BLENDER
    m = np.eye(4)
    m[:3, :3] = b @ r.T @ b.T / scale
    m[:3, 3] = -(b @ r.T @ t) / scale
    return m
