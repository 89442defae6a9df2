"""Bench rows of the photo/video fit (`python -m backend bench`): the astronaut photo (scikit-image's
public-domain sample) on every device, and on CUDA an 8-frame video made from it (the picture rolling by a few
degrees per frame) for the time per frame. Footage is written to a temporary folder and removed."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..engine.bench import Row, _peak_mb, _reset_peak
from ..engine.session import NullProgress
from .op import run as fit_capture

VIDEO_FRAMES = 8


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


def bench_capture(session, dev) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photo, video = _write_footage(Path(tmp))
        jobs = [("photo fit", photo)] + ([("video fit", video)] if dev.type == "cuda" else [])
        for name, path in jobs:
            _reset_peak(dev)
            t = time.perf_counter()
            out, _ = fit_capture(session, {"path": str(path), "resolution": 128}, NullProgress())
            ms = (time.perf_counter() - t) * 1e3
            cap = out["capture"]
            detail = (f"astronaut {cap['width']}x{cap['height']}, {cap['frames']} frame(s): "
                      f"{ms / cap['frames'] / 1e3:.2f} s per frame in all (fit {cap['fit_seconds']:.1f} s, "
                      f"128^3 head mesh); landmark error {cap['landmark_error_px']:.2f} px")
            rows.append(Row(name, dev.type, f"{cap['frames']} frame(s)", ms, detail=detail, peak_mb=_peak_mb(dev)))
    return rows
