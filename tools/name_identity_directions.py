"""Name the identity sliders by what they do: weights/identity_directions.json. Build time only; rerun it
whenever weights/imhead.safetensors changes (the add-on ignores the file when its SHA-256 no longer matches).

    .venv/bin/python tools/name_identity_directions.py [--count 12] [--resolution 64]

The sliders are the leading principal directions of the shipped identity distribution (covariance
id_chol id_chol^T, the add-on computes the same eigenvectors). For each direction this generates the heads at
-2 and +2 standard deviations from the mean code and measures a set of head and face dimensions on their
canonical meshes (regions from the atlas). Each change is measured in units of that dimension's spread over
RANDOM_HEADS random heads of the model; a direction is named after the dimension it changes most in those units
(one not already naming an earlier direction when that one changes at least DISTINCT of the largest), and
oriented (`sign`) so that moving the slider up makes that dimension larger.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIGMAS = 2.0
RANDOM_HEADS = 16
DISTINCT = 0.6


def principal_directions(chol: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count,256) unit directions, largest variance first, each with its first non-zero entry positive (a
    reproducible sign; imhead_blender/identity.py makes the same choice), and their standard deviations."""
    cov = chol.astype(np.float64) @ chol.astype(np.float64).T
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:count]
    dirs = v[:, order].T
    dirs *= np.sign(dirs[np.arange(count), np.abs(dirs).argmax(1)])[:, None]
    return dirs, np.sqrt(np.maximum(w[order], 0.0))


def measures(vertices: np.ndarray, region: np.ndarray, names: list[str]) -> dict[str, float]:
    """Head and face dimensions (metres) of a canonical mesh (+Y up, face toward +Z)."""
    def pts(*regions: str) -> np.ndarray:
        ids = [names.index(r) for r in regions]
        return vertices[np.isin(region, ids)]

    head = vertices[vertices[:, 1] > pts("chin")[:, 1].min()]
    nose = pts("nose bridge", "nose tip", "left nostril", "right nostril")
    face_front = pts("left cheek", "right cheek")[:, 2].mean()
    lips = pts("upper lip", "lower lip")
    size = np.ptp(head, axis=0)
    return {
        "Head Size": float(np.prod(size) ** (1 / 3)),
        "Head Width": float(np.ptp(head[:, 0])),
        "Head Height": float(np.ptp(head[:, 1])),
        "Head Depth": float(np.ptp(head[:, 2])),
        "Face Length": float(pts("nose bridge")[:, 1].max() - pts("chin")[:, 1].min()),
        "Nose Size": float(np.linalg.norm(np.ptp(nose, axis=0))),
        "Nose Projection": float(pts("nose tip")[:, 2].max() - face_front),
        "Jaw Width": float(pts("left jaw")[:, 0].mean() - pts("right jaw")[:, 0].mean()),
        "Eye Spacing": float(pts("left eyeball")[:, 0].mean() - pts("right eyeball")[:, 0].mean()),
        "Chin Projection": float(pts("chin")[:, 2].max() - face_front),
        "Lip Fullness": float(np.ptp(lips[:, 1]) + np.ptp(lips[:, 2])),
        "Ear Size": float(np.linalg.norm(np.ptp(pts("left ear"), axis=0))),
        "Brow Height": float(pts("left eyebrow", "right eyebrow")[:, 1].mean() - pts("left eyeball")[:, 1].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--weights", type=Path, default=REPO / "weights")
    args = p.parse_args(argv)
    from backend.engine.session import Session
    from backend.weights import load_model

    loaded = load_model(args.weights)
    dirs, sigma = principal_directions(loaded.extras["id_chol"].numpy(), args.count)
    mean = loaded.extras["id_mean"].numpy().astype(np.float64)
    session = Session(args.weights, device="cpu")
    names = session.region_names

    def measure(identity: np.ndarray) -> dict[str, float]:
        head = {"format": "imhead-head/1", "identity": identity.astype(np.float32).tolist()}
        _params, arrays = session.generate({"head": head, "resolution": args.resolution}, {})
        return measures(arrays["canonical"], arrays["region"], names)

    chol = loaded.extras["id_chol"].numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    random_heads = [measure(mean + chol @ rng.standard_normal(len(mean))) for _ in range(RANDOM_HEADS)]
    spread = {k: float(np.std([h[k] for h in random_heads])) for k in random_heads[0]}
    out: list = []
    used: set = set()
    for i in range(args.count):
        lo = measure(mean - SIGMAS * sigma[i] * dirs[i])
        hi = measure(mean + SIGMAS * sigma[i] * dirs[i])
        change = {k: (hi[k] - lo[k]) / max(spread[k], 1e-9) for k in spread}
        ranked = sorted(change, key=lambda k: -abs(change[k]))
        fresh = [k for k in ranked if k not in used and abs(change[k]) >= DISTINCT * abs(change[ranked[0]])]
        name = fresh[0] if fresh else ranked[0]
        label = name if name not in used else f"{name} {sum(d['measure'] == name for d in out) + 1}"
        used.add(name)
        out.append({"name": label, "measure": name, "sign": 1 if change[name] > 0 else -1,
                    "effects_mm": {k: round(1000 * (hi[k] - lo[k]), 2) for k in spread},
                    "in_spreads": {k: round(v, 3) for k, v in change.items()}})
        print(f"{i:2d} sigma {sigma[i]:.3f}  {label:18s} {change[name]:+.2f} spreads over -2..+2 sd", flush=True)
    weights_file = args.weights / "imhead.safetensors"
    doc = {"format": "imhead-identity-directions/1",
           "weights_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
           "sigmas_measured": SIGMAS, "resolution": args.resolution, "random_heads": RANDOM_HEADS,
           "spread_mm": {k: round(1000 * v, 2) for k, v in spread.items()}, "directions": out}
    path = args.weights / "identity_directions.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
