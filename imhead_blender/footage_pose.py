"""Head pose and camera of a photo/video fit in Blender terms, kept free of bpy so it is unit-testable.

The backend returns per frame x_camera = R_t x_model + t_t (camera looking down -Z, +Y up: a Blender camera's
own frame). The head mesh is stored in Blender axes, q = A x_model (axes.BACKEND_TO_BLENDER). With the camera
object at C = [A | -A t_mean], the head's world matrix is C [R_t A^T | t_t] = [A R_t A^T | A (t_t - t_mean)]:
the head sits at the origin, upright, at its mean distance, and the camera looks at it along +Y."""

import numpy as np

from .axes import BACKEND_TO_BLENDER

SENSOR_WIDTH_MM = 36.0


def _check(rotations: np.ndarray, translations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rotations, np.float64)
    t = np.asarray(translations, np.float64)
    if r.ndim != 3 or r.shape[1:] != (3, 3) or t.shape != (len(r), 3) or len(r) == 0:
        raise ValueError(f"expected rotations (T,3,3) and translations (T,3), got {r.shape} and {t.shape}")
    if not (np.isfinite(r).all() and np.isfinite(t).all()):
        raise ValueError("pose has NaN or infinite values")
    return r, t


def head_matrices(rotations: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """(T, 4, 4) world matrices of the head object, one per frame."""
    r, t = _check(rotations, translations)
    a = BACKEND_TO_BLENDER
    m = np.tile(np.eye(4), (len(r), 1, 1))
    m[:, :3, :3] = a @ r @ a.T
    m[:, :3, 3] = (t - t.mean(0)) @ a.T
    return m


def camera_matrix(translations: np.ndarray) -> np.ndarray:
    """(4, 4) world matrix of the fixed camera that looks at the head as the footage's camera did."""
    t = np.asarray(translations, np.float64)
    a = BACKEND_TO_BLENDER
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = -(a @ t.mean(0))
    return m


def lens_mm(focal_px: float, width: int) -> float:
    """Focal length in mm for a sensor SENSOR_WIDTH_MM wide fitted horizontally across `width` pixels."""
    if not (np.isfinite(focal_px) and focal_px > 0 and width > 0):
        raise ValueError(f"bad camera: focal {focal_px} px, width {width}")
    return float(focal_px) * SENSOR_WIDTH_MM / width
