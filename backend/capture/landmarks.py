"""2D face landmarks per frame with MediaPipe's face mesh (468 points). mediapipe 0.10.21 is pinned because its
wheel carries the face detector and face-mesh TFLite models (mediapipe/modules/face_detection/*.tflite,
mediapipe/modules/face_landmark/face_landmark.tflite); the 1.x wheels ship none and download them at run time,
which this project does not allow (docs/capture.md)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidInput
from .correspondence import mediapipe_indices

MIN_DETECTION = 0.5
MIN_FACE_FRACTION = 0.8  # of a video's frames that must show the face
SMOOTH_MIN_FPS = 20.0  # below this a head turn moves too far between frames for the [1, 2, 1] filter


def detect(frames: np.ndarray, video: bool, check: Callable[[int], None] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (T, 468, 2) in pixels (x right, y down) and found (T,) bool. InvalidInput when no face is
    found, when any frame shows more than one face, or when a video loses the face in too many frames.
    `check(t)` runs before each frame (progress and cancel)."""
    from mediapipe.python.solutions import face_mesh

    T, H, W, _ = frames.shape
    out = np.zeros((T, 468, 2), np.float32)
    found = np.zeros(T, bool)
    # video: the face mesh tracks from frame to frame (steadier than detecting each frame anew)
    with face_mesh.FaceMesh(static_image_mode=not video, max_num_faces=2, refine_landmarks=False,
                            min_detection_confidence=MIN_DETECTION) as mesh:
        for t in range(T):
            if check is not None:
                check(t)
            result = mesh.process(np.ascontiguousarray(frames[t]))
            faces = result.multi_face_landmarks or []
            if len(faces) > 1:
                where = f" in frame {t}" if video else ""
                raise InvalidInput(f"{len(faces)} faces found{where}: use footage with one face")
            if faces:
                out[t] = [(p.x * W, p.y * H) for p in faces[0].landmark]
                found[t] = True
    if not found.any():
        raise InvalidInput("no face found" + (" in any frame" if video else " in the picture"))
    if found.mean() < MIN_FACE_FRACTION:
        raise InvalidInput(f"a face was found in only {found.sum()} of {T} frames: use footage where the face "
                           "stays in view")
    return out, found


def fill_gaps(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Frames without a face take the nearest found frame's landmarks (their fit weight is set to 0)."""
    idx = np.flatnonzero(found)
    nearest = idx[np.abs(np.arange(len(found))[:, None] - idx[None]).argmin(1)]
    return points[nearest]


def smooth(points: np.ndarray) -> np.ndarray:
    """Temporal [1, 2, 1] / 4 filter on landmark tracks (T, L, 2), ends kept: takes out the detector's
    frame-to-frame jitter (about a pixel) without lagging real motion by more than half a frame."""
    if len(points) < 3:
        return points
    out = points.copy()
    out[1:-1] = 0.25 * points[:-2] + 0.5 * points[1:-1] + 0.25 * points[2:]
    return out


def fit_landmarks(all_points: np.ndarray) -> np.ndarray:
    """(T, 468, 2) -> (T, 52, 2): the landmarks the fit uses (correspondence.USED)."""
    return all_points[:, mediapipe_indices()]
