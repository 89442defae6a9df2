"""Bench rows of the photo/video fit (`python -m backend bench`): the astronaut photo (scikit-image's
public-domain sample) on every device, and on CUDA an 8-frame video made from it (the picture rolling by a few
degrees per frame) for the time per frame. Footage is written to a temporary folder and removed.

The lent GPU machines have neither mediapipe nor PyAV (their wheels are larger than what travels there), so
`python -m backend.capture.bench --save-tracks FILE` decodes and tracks both clips where they are installed and
saves frames and landmarks (plain arrays, no pickle); `bench --capture-tracks FILE` then times everything after
tracking on the machine without them and says so in the row."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ..engine.bench import Row, _peak_mb, _reset_peak
from ..engine.session import NullProgress
from ..payloads import FitCaptureRequest
from . import media
from .op import fit_tracked, track

VIDEO_FRAMES = 8
RESOLUTION = 128
CLIPS = ("photo", "video")


def _write_footage(folder: Path) -> tuple[Path, Path]:
    import av
    import skimage.data
    from PIL import Image
    from skimage.transform import rotate

    img = skimage.data.astronaut()
    photo = folder / "astronaut.png"
    Image.fromarray(img).save(photo)
    video = folder / "astronaut.mp4"
    crop = img[0:320, 80:400]
    with av.open(str(video), mode="w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.height, stream.width = crop.shape[:2]
        stream.pix_fmt = "yuv420p"
        for t in range(VIDEO_FRAMES):
            angle = 12.0 * np.sin(2 * np.pi * t / VIDEO_FRAMES)
            frame = (rotate(crop, angle, center=(160, 240), mode="edge") * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return photo, video


def _tracked_clips(folder: Path) -> dict[str, tuple[media.Footage, np.ndarray, np.ndarray, float]]:
    """Decode and track both clips: footage, landmarks, found, tracking seconds (decode included)."""
    clips = {}
    for name, path in zip(CLIPS, _write_footage(folder), strict=True):
        t = time.perf_counter()
        footage = media.load_footage(path)
        points, found = track(footage, NullProgress())
        clips[name] = (footage, points, found, time.perf_counter() - t)
    return clips


def save_tracks(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clips = _tracked_clips(Path(tmp))
    arrays: dict[str, np.ndarray] = {}
    for name, (footage, points, found, seconds) in clips.items():
        arrays.update({f"{name}_frames": footage.frames, f"{name}_fps": np.asarray(footage.fps),
                       f"{name}_points": points, f"{name}_found": found, f"{name}_track_s": np.asarray(seconds)})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_tracks(path: Path) -> dict[str, tuple[media.Footage, np.ndarray, np.ndarray, float]]:
    with np.load(path, allow_pickle=False) as data:
        return {name: (media.Footage(data[f"{name}_frames"], float(data[f"{name}_fps"]), f"{name} ({path.name})"),
                       data[f"{name}_points"], data[f"{name}_found"].astype(bool), float(data[f"{name}_track_s"]))
                for name in CLIPS}


def _trackers_installed() -> bool:
    try:
        import av  # noqa: F401
        import mediapipe  # noqa: F401
    except ImportError:
        return False
    return True


def bench_capture(session, dev, tracks: Path | None = None) -> list[Row]:
    """Rows "photo fit" (every device) and "video fit" (CUDA): the whole fit_capture op per frame. Where
    mediapipe or PyAV is missing, the clips come tracked from `tracks` and the time starts after tracking."""
    names = ["photo"] + (["video"] if dev.type == "cuda" else [])
    precomputed = not _trackers_installed()
    if precomputed and (tracks is None or not tracks.is_file()):
        return [Row(f"{name} fit", dev.type, "", detail="skipped: needs mediapipe and PyAV, or --capture-tracks "
                    "from `python -m backend.capture.bench --save-tracks`") for name in names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = _load_tracks(tracks) if precomputed else None  # type: ignore[arg-type]
        for name in names:
            _reset_peak(dev)
            t = time.perf_counter()
            if clips is None:  # tracking timed with the fit, as a user's fit runs
                path = _write_footage(Path(tmp))[CLIPS.index(name)]
                t = time.perf_counter()
                footage = media.load_footage(path)
                points, found = track(footage, NullProgress())
                track_s = None
            else:
                footage, points, found, track_s = clips[name]
            request = FitCaptureRequest.from_dict({"path": footage.path, "resolution": RESOLUTION})
            out, _ = fit_tracked(session, request, footage, points, found, NullProgress())
            ms = (time.perf_counter() - t) * 1e3
            cap = out["capture"]
            how = ("in all" if track_s is None else
                   f"after tracking (decode + mediapipe ran beforehand on another machine: {track_s:.2f} s in all, "
                   "not in this time)")
            detail = (f"astronaut {cap['width']}x{cap['height']}, {cap['frames']} frame(s): "
                      f"{ms / cap['frames'] / 1e3:.2f} s per frame {how} (fit {cap['fit_seconds']:.1f} s, "
                      f"{RESOLUTION}^3 head mesh); landmark error {cap['landmark_error_px']:.2f} px")
            rows.append(Row(f"{name} fit", dev.type, f"{cap['frames']} frame(s)", ms, detail=detail,
                            peak_mb=_peak_mb(dev)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--save-tracks", type=Path, required=True, metavar="FILE.npz")
    save_tracks(parser.parse_args().save_tracks)


if __name__ == "__main__":
    main()
