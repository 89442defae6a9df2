"""scripts/demo.py (the README's main command after setup and build) at thumbnail settings: installs the
built zip into an isolated Blender user folder, generates through the panel's operator, saves and renders."""

import struct
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_demo_script_saves_blend_and_renders(built_zip, venv_python, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [venv_python, str(REPO / "scripts" / "demo.py"), "--zip", str(built_zip), "--out", str(out),
         "--resolution", "32", "--size", "64", "--samples", "1", "--timeout", "900"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "generated imHead." in proc.stdout
    assert (out / "demo.blend").stat().st_size > 10_000
    assert _png_size(out / "demo.png") == (64, 64)
    # The user's own Blender configuration is untouched: everything went under out/blender_user.
    assert any((out / "blender_user" / "extensions" / "user_default").iterdir())
