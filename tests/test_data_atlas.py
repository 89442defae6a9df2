"""Invariants of the shipped region atlas (weights/atlas.safetensors) and the regions command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def atlas():
    from backend.data.atlas import load_atlas

    return load_atlas()


def test_atlas_invariants(atlas):
    from backend.data.atlas import problems

    assert problems(atlas) == []
    assert len(atlas.names) == 39 and len(set(atlas.names)) == 39
    assert np.array_equal(np.unique(atlas.region), np.arange(39))          # full coverage, no empty region
    assert len(atlas.expressions) == 53 and "MIT" in atlas.licence
    assert atlas.uv.shape == (len(atlas.faces), 3, 2)
    assert (REPO / "weights" / "atlas.safetensors").stat().st_size < 2e6


def test_mirror_pairs_map_under_x_flip(atlas):
    v = atlas.vertices.astype(np.float64)
    for r, m in enumerate(atlas.mirror):
        if m is None:
            assert np.abs(atlas.anchors[r, 0]) < 1e-6, atlas.names[r]       # midline anchors on x = 0
            continue
        assert atlas.mirror[m] == r
        assert atlas.names[r].split(" ", 1)[1] == atlas.names[m].split(" ", 1)[1]
        flipped = atlas.anchors[r] * (-1, 1, 1)
        assert np.abs(flipped - atlas.anchors[m]).max() < 1e-4
        # every vertex of r, mirrored, lands on a vertex of m
        idx = np.flatnonzero(atlas.region == r)
        assert (atlas.region[atlas.mirror_vertex[idx]] == m).all()
        assert np.abs(v[atlas.mirror_vertex[idx]] * (-1, 1, 1) - v[idx]).max() < 1e-4
    left = [n for n in atlas.names if n.startswith("left ")]
    assert len(left) == 14
    # "left" is the subject's left, +x
    for n in left:
        assert atlas.anchors[atlas.names.index(n), 0] > 0, n


def test_region_contiguity_detects_a_split(atlas):
    """The contiguity check can fail: moving one far vertex into another region breaks it."""
    from backend.data.atlas import Atlas, problems

    broken = Atlas(**{**atlas.__dict__, "region": atlas.region.copy()})
    crown = atlas.names.index("crown")
    far = np.flatnonzero(atlas.region == atlas.names.index("chin"))[0]
    broken.region[far] = crown
    assert any("crown has 2 pieces" in p for p in problems(broken))


def test_regions_command_json():
    out = subprocess.run([sys.executable, "-m", "backend", "regions", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = json.loads(out)
    assert len(rows) == 39 and rows[0].keys() == {"id", "name", "mirror", "anchor"}
    assert [r["id"] for r in rows] == list(range(39))
    by_name = {r["name"]: r for r in rows}
    assert by_name["left ear"]["mirror"] == by_name["right ear"]["id"] and by_name["nose tip"]["mirror"] is None
    assert 0.1 < by_name["nose tip"]["anchor"][2] < 0.14                         # metres, face toward +Z


def test_atlas_checksum_is_enforced(tmp_path):
    from backend.data.atlas import load_atlas
    from backend.errors import WeightsError

    src = REPO / "weights" / "atlas.safetensors"
    dst = tmp_path / "atlas.safetensors"
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_atlas(dst)                                                          # no checksum file
    (tmp_path / "atlas.safetensors.sha256").write_text((REPO / "weights" / "atlas.safetensors.sha256").read_text())
    assert len(load_atlas(dst).names) == 39
    data[-1] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        load_atlas(dst)
