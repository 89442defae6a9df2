"""Decode a photo or a short video into RGB frames: images through Pillow, videos through PyAV (FFmpeg's
libraries, bundled in its wheel). Only the one path the user chose is opened, read-only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
MAX_FRAMES = 600  # a fit keeps every frame and its landmarks in memory: 20 s at 30 fps
MAX_PIXELS = 400e6  # decoded RGB bytes / 3 over all frames (1.2 GB): e.g. 190 frames of 1920x1080
MAX_SIDE = 8192


@dataclass
class Footage:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float  # frames per second (0 for a photo)
    path: str

    @property
    def is_video(self) -> bool:
        return self.fps > 0


def load_footage(path: str | Path, max_frames: int = MAX_FRAMES, max_pixels: float = MAX_PIXELS) -> Footage:
    """A photo or a video by its suffix; InvalidInput for anything unreadable, empty, or too long."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Footage(_read_image(path)[None], 0.0, str(path))
    if suffix in VIDEO_SUFFIXES:
        frames, fps = _read_video(path, max_frames, max_pixels)
        return Footage(frames, fps, str(path))
    raise InvalidInput(f"{path.name}: unsupported file type {suffix or '(none)'}; images: "
                       f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))}")


def _check_size(h: int, w: int, path: Path) -> None:
    if min(h, w) < 32 or max(h, w) > MAX_SIDE:
        raise InvalidInput(f"{path.name}: {w}x{h} pixels; frames must be 32 to {MAX_SIDE} pixels a side")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"{path.name}: not a readable image ({exc})") from exc
    _check_size(rgb.shape[0], rgb.shape[1], path)
    return np.ascontiguousarray(rgb)


def _read_video(path: Path, max_frames: int, max_pixels: float) -> tuple[np.ndarray, float]:
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise InvalidInput(f"{path.name}: the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            pixels = 0.0
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                _check_size(rgb.shape[0], rgb.shape[1], path)
                pixels += rgb.shape[0] * rgb.shape[1]
                if len(frames) >= max_frames or pixels > max_pixels:
                    raise InvalidInput(
                        f"{path.name}: the video is too long to fit in memory (more than {len(frames)} frames of "
                        f"{rgb.shape[1]}x{rgb.shape[0]}; at most {max_frames} frames and {max_pixels / 1e6:.0f} "
                        "megapixels in all): trim it or lower its resolution")
                frames.append(rgb)
    except av.error.FFmpegError as exc:
        raise InvalidInput(f"{path.name}: not a readable video ({exc})") from exc
    if not frames:
        raise InvalidInput(f"{path.name}: the video has no frames")
    return np.stack(frames), fps
