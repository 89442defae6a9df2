"""The bench's bake row: chunked deforms as the add-on's Bake sends them, timed per frame."""

import re
from pathlib import Path

import numpy as np
import pytest

from backend.engine.bench_bake import BAKE_CHUNK_POINTS, animation, bench_bake
from backend.engine.session import Session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def test_chunk_matches_the_addon():
    text = (REPO / "imhead_blender" / "deform_jobs.py").read_text()
    assert int(re.search(r"^CHUNK_POINTS = ([\d_]+)", text, re.M).group(1)) == BAKE_CHUNK_POINTS


def test_animation_is_smooth_and_in_range():
    w = animation(60, 53, seed=1)
    assert w.shape == (60, 53) and w.min() >= 0.0 and w.max() <= 1.0
    assert np.abs(np.diff(w, axis=0)).max() < 0.2  # eased between keys 12 frames apart
    assert (w > 0).any(axis=0).sum() > 10


def test_bake_row_reports_frames_per_second(session, monkeypatch):
    import backend.engine.bench_bake as bb

    calls = []
    deform = session.deform
    monkeypatch.setattr(session, "deform", lambda p, a: calls.append(len(a["expressions"])) or deform(p, a))
    monkeypatch.setattr(bb, "BAKE_CHUNK_POINTS", 1)  # one frame per request, as for a very large mesh
    row = bench_bake(session, frames=3, resolution=24)
    assert calls == [1, 1, 1]
    assert row.task == "bake / frame" and row.size == "24^3, 3 frames" and row.ours_ms > 0
    fps = float(row.detail.split(" frames/s")[0])
    assert fps == pytest.approx(1e3 / row.ours_ms, rel=0.02)
