"""Which model points the 2D landmarks are: MediaPipe face-mesh indices -> the 68-point Multi-PIE markup ->
ICT-FaceKit template vertices (the ICT-FaceKit README's "Multi-PIE 68 point facial landmarks indices"; the
atlas keeps ICT's vertex numbering). The 17 jawline points are left out: on a photo they lie on the face's
outline, which slides over the skin as the head turns, not on fixed skin points. The chin (8) is kept.
MediaPipe's points do not sit exactly on those vertices: landmark_offsets.json (tools/calibrate_landmarks.py,
from rendered generated heads with known answers) moves each target to where MediaPipe puts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ICT-FaceKit README, 0-indexed, Multi-PIE order (0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth)
ICT_MULTIPIE68 = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272, 4088, 3443, 268, 493,
    1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942, 4857, 1140, 2075, 1147, 4269, 3360, 1507, 1542,
    1537, 1528, 1518, 1511, 3742, 3751, 3756, 3721, 3725, 3732, 5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461,
    5518, 5957, 5841, 5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966)
# MediaPipe face mesh (468 points) index of each Multi-PIE point, the same order
MEDIAPIPE_MULTIPIE68 = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87)
USED = (8, *range(17, 68))  # chin + brows, nose, eyes, mouth
# Landmarks a turned head's outline does not move; weight 1, the chin less (its skin point is less sharp)
WEIGHTS = np.array([0.5] + [1.0] * 51, np.float32)


def template_vertices() -> np.ndarray:
    """(52,) ICT vertex ids of the landmarks used by the fit, in USED order."""
    return np.array([ICT_MULTIPIE68[i] for i in USED], np.int64)


def mediapipe_indices() -> np.ndarray:
    """(52,) MediaPipe face-mesh indices of the landmarks used by the fit, in USED order."""
    return np.array([MEDIAPIPE_MULTIPIE68[i] for i in USED], np.int64)


OFFSETS = Path(__file__).with_name("landmark_offsets.json")


def template_targets(template: np.ndarray, offsets: Path = OFFSETS) -> np.ndarray:
    """(52, 3) template points of the landmarks used by the fit: their ICT vertices in `template` (the
    atlas's vertices) moved by the calibrated offsets."""
    table = json.loads(offsets.read_text())["offsets"]
    shift = np.array([table[str(i)] for i in USED], np.float32)
    return template[template_vertices()].astype(np.float32) + shift
