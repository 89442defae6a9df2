"""Known-answer measures of a photo/video fit (docs/capture.md): head rotation error, expression weight MAE
and the fitted neutral head's surface Chamfer distance (L1) to the true one on the face."""

from __future__ import annotations

import numpy as np

# The face in the model frame (m): in front of the ears, brow to chin
FACE_BOX_MIN = np.array([-0.07, -0.10, 0.04])
FACE_BOX_MAX = np.array([0.07, 0.07, 0.20])


def yaw_matrix(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])


def rotation_error_deg(fitted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Angle (T,) of fitted_t true_t^T: the rotation between two (T,3,3) sequences, in degrees."""
    rel = np.einsum("tij,tkj->tik", fitted.astype(np.float64), true.astype(np.float64))
    cos = (np.trace(rel, axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def relative_rotations(rot: np.ndarray) -> np.ndarray:
    """R_t R_0^T: the head's turn since the first frame, independent of how the camera looks at it."""
    return np.einsum("tij,kj->tik", rot.astype(np.float64), rot[0].astype(np.float64))


def expression_mae(fitted: np.ndarray, true: np.ndarray) -> float:
    return float(np.abs(fitted - true).mean())


def face_cd_l1_mm(fitted_v: np.ndarray, fitted_f: np.ndarray, true_v: np.ndarray, true_f: np.ndarray) -> float:
    """Symmetric mean point-to-surface distance (mm) between the two meshes' vertices inside the face box,
    each measured to the other whole mesh (so the box's cut does not count as error)."""
    from ..engine.template import MeshIndex

    a = MeshIndex(true_v, true_f).closest(_face(fitted_v))[2]
    b = MeshIndex(fitted_v, fitted_f).closest(_face(true_v))[2]
    return float(1e3 * (a.mean() + b.mean()) / 2)


def _face(v: np.ndarray) -> np.ndarray:
    """The vertices inside the face box."""
    return v[((v >= FACE_BOX_MIN) & (v <= FACE_BOX_MAX)).all(1)]


def aligned_face_cd_l1_mm(fitted_v: np.ndarray, fitted_f: np.ndarray, true_v: np.ndarray, true_f: np.ndarray,
                          scale: bool = False) -> tuple[float, tuple[float, np.ndarray, np.ndarray]]:
    """face_cd_l1_mm after align_face's transform of the fitted head, and that transform (s, R, t)."""
    s, rot, t = align_face(fitted_v, true_v, true_f, scale=scale)
    moved = s * fitted_v.astype(np.float64) @ rot.T + t
    return face_cd_l1_mm(moved, fitted_f, true_v, true_f), (s, rot, t)


def align_face(fitted_v: np.ndarray, true_v: np.ndarray, true_f: np.ndarray, scale: bool = False,
               iterations: int = 30) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity (scale=True) or rigid transform y = s R x + t that moves the fitted head's face-box
    vertices onto the true surface (ICP, point to closest surface point, Umeyama's closed form each round).
    A photo or video fixes a head only up to such a transform traded with the camera (a larger head farther
    away, a face turned in its own frame under the opposite head turn), so it splits a fit's face error into
    that gauge and the shape itself."""
    from ..engine.template import MeshIndex

    index = MeshIndex(true_v, true_f)
    x = _face(fitted_v).astype(np.float64)
    corners = true_v[true_f].astype(np.float64)
    s, rot, t = 1.0, np.eye(3), np.zeros(3)
    for _ in range(iterations):
        y = s * x @ rot.T + t
        face, bary, _ = index.closest(y)
        target = np.einsum("nk,nkd->nd", bary, corners[face])
        mx, my = x.mean(0), target.mean(0)
        cov = (target - my).T @ (x - mx) / len(x)
        u, sig, vt = np.linalg.svd(cov)
        d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
        rot = u @ d @ vt
        s = float(np.trace(np.diag(sig) @ d) / ((x - mx) ** 2).sum(1).mean()) if scale else 1.0
        t = my - s * rot @ mx
    return s, rot, t
