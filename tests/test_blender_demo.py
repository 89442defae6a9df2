"""scripts/demo.py (the README's main command after setup and build) at thumbnail settings: installs the
built zip into an isolated Blender user folder, generates through the panel's operator, saves and renders, then
makes the ARKit shape keys, imports the bundled capture, writes the GLB and the animation's contact sheet."""

import json
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_demo_script_saves_blend_and_renders(built_zip, venv_python, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [venv_python, str(REPO / "scripts" / "demo.py"), "--zip", str(built_zip), "--out", str(out),
         "--resolution", "32", "--size", "64", "--samples", "1", "--timeout", "900",
         "--sheet-frames", "6", "--sheet-size", "32", "--sheet-samples", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "generated imHead." in proc.stdout
    assert (out / "demo.blend").stat().st_size > 10_000
    assert _png_size(out / "demo.png") == (64, 64)
    # The user's own Blender configuration is untouched: everything went under out/blender_user.
    assert any((out / "blender_user" / "extensions" / "user_default").iterdir())
    # The animation: a contact sheet of 6 frames (4 columns, 2 rows of 32 px with 4 px gutters) and a GLB that
    # another reader (this JSON chunk) sees with 52 named morph targets and their weights animated.
    assert "made 52 ARKit shape keys" in proc.stdout
    assert _png_size(out / "demo_anim.png") == (4 * 32 + 5 * 4, 2 * 32 + 3 * 4)
    doc = _glb_json(out / "demo.glb")
    mesh = doc["meshes"][0]
    assert len(mesh["primitives"][0]["targets"]) == 52
    assert mesh["extras"]["targetNames"][:2] == ["eyeBlinkLeft", "eyeLookDownLeft"]
    assert mesh["extras"]["targetNames"][-1] == "tongueOut"
    channels = [c for a in doc["animations"] for c in a["channels"] if c["target"]["path"] == "weights"]
    assert channels
    sampler = doc["animations"][0]["samplers"][channels[0]["sampler"]]
    times = doc["accessors"][sampler["input"]]
    assert times["count"] >= 48 and times["max"][0] == pytest.approx(48 / 24, abs=1e-3)  # frames 1-48, 24 fps


def _glb_json(path: Path) -> dict:
    data = path.read_bytes()
    magic, _version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and length == len(data)
    chunk_length, chunk_type = struct.unpack("<II", data[12:20])
    assert chunk_type == 0x4E4F534A  # JSON
    return json.loads(data[20 : 20 + chunk_length])
