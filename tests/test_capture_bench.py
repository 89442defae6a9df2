"""The photo/video bench rows on a machine without mediapipe or PyAV (the lent GPUs): clips tracked elsewhere
come back from the saved file exactly, a missing file gives a skipped row, and the CLI rejects a wrong path."""

from __future__ import annotations

import sys

import numpy as np
import torch

from backend.capture import bench, media
from backend.capture.op import track
from backend.engine.session import NullProgress


def test_saved_tracks_load_back_exactly(tmp_path) -> None:
    path = tmp_path / "tracks.npz"
    bench.save_tracks(path)
    clips = bench._load_tracks(path)
    assert set(clips) == {"photo", "video"}
    footage, points, found, seconds = clips["video"]
    assert footage.frames.shape[0] == bench.VIDEO_FRAMES and footage.is_video and seconds > 0
    assert found.dtype == bool and found.all()
    photo, photo_points, _, _ = clips["photo"]
    assert not photo.is_video
    # the saved landmarks are the tracker's on the saved frames (tracking is deterministic on a photo)
    again, _ = track(media.Footage(photo.frames, photo.fps, "again"), NullProgress())
    np.testing.assert_array_equal(again, photo_points)
    assert points.shape == (bench.VIDEO_FRAMES, 468, 2)


def test_without_trackers_and_tracks_the_rows_say_skipped(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import then raises ImportError
    rows = bench.bench_capture(None, torch.device("cuda"), None)
    assert [r.task for r in rows] == ["photo fit", "video fit"]
    assert all(r.ours_ms is None and r.detail.startswith("skipped") for r in rows)


def test_cli_rejects_a_missing_tracks_file(tmp_path) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "backend", "bench", "--capture-tracks", str(tmp_path / "none.npz")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--capture-tracks: no such file" in proc.stderr

