"""The `fit_capture` op (server and CLI): footage path in; the fitted neutral head's mesh, per-frame expression
weights and head pose, and the camera out (docs/protocol.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.head import HeadSpec
from ..payloads import FitCaptureRequest
from .correspondence import template_targets

BACKGROUND_SPREAD = 12.0  # RGB levels: a border mostly this uniform (median) counts as a plain background
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour that counts as foreground


def foreground_masks(frames: np.ndarray) -> np.ndarray | None:
    """(T,H,W) bool where a frame differs from its plain background, or None when the border of any frame is
    not mostly one plain colour (a real room: the silhouette term is then left out). Mostly: a bust's
    shoulders may cross the bottom edge. Holes are filled: shadows in the nostrils, the mouth or under the
    chin can be as dark as the background, and a silhouette has no holes (the model's surface covers them)."""
    from scipy.ndimage import binary_fill_holes

    masks = []
    for f in frames.astype(np.float32):
        border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
        colour = np.median(border, 0)
        if np.median(np.linalg.norm(border - colour, axis=1)) > BACKGROUND_SPREAD:
            return None
        masks.append(binary_fill_holes(np.linalg.norm(f - colour, axis=-1) > FOREGROUND_DISTANCE))
    return np.stack(masks)


def run(session, params: dict, progress, overrides: dict | None = None) -> tuple[dict, dict]:
    """`overrides`: FitSettings fields to change (tools that compare settings; the protocol sets none)."""
    from . import media

    request = FitCaptureRequest.from_dict(params)
    assert request.max_frames is not None  # defaulted
    progress.report(0.0, f"reading {Path(request.path).name}")
    footage = media.load_footage(request.path, max_frames=request.max_frames)
    points, found = track(footage, progress)
    return fit_tracked(session, request, footage, points, found, progress, overrides)


def track(footage, progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame 2D landmarks (T, 468, 2) and whether a face was found (T,), gaps filled."""
    from ..engine.session import check_cancel
    from . import landmarks

    T = len(footage.frames)

    def check(t: int) -> None:
        check_cancel(progress)
        progress.report(0.05 + 0.1 * t / T, f"finding the face (frame {t + 1}/{T})")

    points, found = landmarks.detect(footage.frames, footage.is_video, check)
    return landmarks.fill_gaps(points, found), found


def fit_tracked(session, request: FitCaptureRequest, footage, points: np.ndarray, found: np.ndarray,
                progress, overrides: dict | None = None) -> tuple[dict, dict]:
    """Everything after tracking: smoothing, the fit on the session's device and the fitted head's mesh."""
    from ..engine.session import check_cancel
    from . import landmarks, photometric
    from .fit import FitSettings, fit_capture

    resolution = request.resolution
    assert resolution is not None and request.seed is not None  # defaults
    settings = FitSettings(seed=request.seed, **(overrides or {}))
    if request.steps is not None:
        settings.steps = request.steps
    if request.silhouette is not None:
        settings.silhouette = request.silhouette
    if request.focal_px is not None:  # known from the clip's camera; else estimated (fit.py)
        settings.focal_px = request.focal_px
    T, H, W, _ = footage.frames.shape
    if footage.fps >= landmarks.SMOOTH_MIN_FPS:
        points = landmarks.smooth(points)
    observed = landmarks.fit_landmarks(points)
    masks = foreground_masks(footage.frames) if settings.silhouette else None

    def report(fraction: float, message: str) -> None:
        check_cancel(progress)
        progress.report(0.15 + 0.6 * fraction, message)

    atlas = session.atlas
    targets = template_targets(atlas.vertices)
    skin = atlas.vertices[photometric.skin_vertices(atlas.vertices, atlas.region, atlas.names,
                                                    settings.photo_points, request.seed)]
    fit = fit_capture(session.model, session.extras, targets, observed, found, masks, W, H, footage.is_video,
                      settings, report, images=footage.frames, skin=skin)
    check_cancel(progress)
    head = HeadSpec(identity=fit.z_id)

    class _Tail:
        cancelled = property(lambda self: progress.cancelled)

        def report(self, fraction: float, message: str) -> None:
            progress.report(0.75 + 0.25 * fraction, message)

    out, arrays = session.head_mesh(head, resolution, _Tail())
    out["capture"] = {
        "frames": T, "fps": footage.fps, "width": W, "height": H, "focal_px": fit.focal_px,
        "faces_found": int(found.sum()), "landmark_error_px": fit.landmark_error_px,
        "silhouette": masks is not None, "silhouette_iou": fit.silhouette_iou,
        "outline_error_px": fit.outline_error_px, "fit_seconds": fit.seconds,
    }
    arrays.update(expressions=fit.expressions, rotations=fit.rotation, translations=fit.translation,
                  landmarks=fit.observed, fitted_landmarks=fit.projected.astype(np.float32),
                  found=found.astype(np.uint8))
    return out, arrays
