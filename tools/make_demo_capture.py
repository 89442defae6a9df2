"""Write scripts/demo_capture.csv: a short synthetic face capture in Live Link Face's CSV layout for the demo.

Not a recording: smooth hand-set curves (smile, a blink, raised brows, a small jaw opening, a head turn) so the
demo has a capture to import that anyone may redistribute. 2 s of rows at 60 Hz on a 30 fps timecode
(HH:MM:SS:FF.500 for the in-between rows), as Live Link Face writes at 60 fps.
    .venv/bin/python tools/make_demo_capture.py
"""

import importlib
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The add-on package's __init__ imports bpy; these two modules are Blender-free, so load them without it.
_package = types.ModuleType("imhead_blender")
_package.__path__ = [str(ROOT / "imhead_blender")]
sys.modules.setdefault("imhead_blender", _package)
arkit = importlib.import_module("imhead_blender.arkit")
capture_csv = importlib.import_module("imhead_blender.capture_csv")


def bump(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / width) ** 2)


def main() -> None:
    t = np.arange(120) / 60.0
    w = np.zeros((len(t), len(arkit.ARKIT_NAMES)))

    def put(name: str, values: np.ndarray) -> None:
        w[:, arkit.ARKIT_NAMES.index(name)] = np.clip(values, 0.0, 1.0)

    smile = np.clip((t - 0.2) / 0.5, 0, 1) * np.clip((1.9 - t) / 0.4, 0, 1)
    put("mouthSmileLeft", 0.8 * smile)
    put("mouthSmileRight", 0.75 * smile)
    put("cheekSquintLeft", 0.3 * smile)
    put("cheekSquintRight", 0.3 * smile)
    put("eyeBlinkLeft", bump(t, 1.0, 0.06))
    put("eyeBlinkRight", bump(t, 1.0, 0.06))
    put("browInnerUp", 0.7 * bump(t, 1.45, 0.2))
    put("browOuterUpLeft", 0.5 * bump(t, 1.45, 0.2))
    put("browOuterUpRight", 0.5 * bump(t, 1.45, 0.2))
    put("jawOpen", 0.25 * bump(t, 1.45, 0.2))
    head = np.stack([0.15 * np.sin(np.pi * t), 0.05 * np.sin(2 * np.pi * t), np.zeros_like(t)], axis=1)
    w[w < 1e-3] = 0.0  # the curves' far tails: exact zeros read better in the file
    text = capture_csv.write(w.astype(np.float32), 60.0, head)
    # Live Link Face's own timecode runs at 30 fps: frame f of 60 Hz is 30 fps frame f/2 (.000 or .500)
    lines = text.splitlines()
    out = [lines[0]]
    for f, line in enumerate(lines[1:]):
        sec, rest = divmod(f, 60)
        out.append(f"10:21:{33 + sec:02d}:{rest / 2:06.3f}," + line.split(",", 1)[1])
    (ROOT / "scripts" / "demo_capture.csv").write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
