"""Score `python -m backend fit` on held-out ICT identities as `eval` scores its own fits (issue 13, point 5).

    .venv/bin/python tools/fit_cli_check.py --ict .data/ict.safetensors [--identities 2] [--resolution 256]
        [--steps 300] [--device cpu] [--out DIR]

Per identity: 10,000 area-uniform points (with normals) of the held-out neutral ICT head's exposed surface, as
`eval` samples them, written to a PLY point cloud; the CLI fits it in a subprocess (units given as metres, the
identity only) and writes its mesh; the mesh is scored against the ICT head with `eval`'s metric
(`backend.data.metrics.evaluate_ict`, 200,000 samples). The CLI returns the opened head (cut 5 cm above the
template's neck opening), so the whole-head numbers count the neck below the cut as missing; the face area's
are comparable with `eval`'s. A docs tool: not shipped, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POINTS = 10_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ict", type=Path, required=True)
    ap.add_argument("--identities", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", type=Path, default=None, help="keep the point clouds and fitted meshes here")
    args = ap.parse_args()

    from backend.data import metrics, splits
    from backend.data.ict import load_ict
    from backend.engine.meshio import read_mesh, write_ply

    ict = load_ict(args.ict)
    exposed = (ict.face_buried == 0).astype(np.float64)
    work = args.out or Path(tempfile.mkdtemp(prefix="fit_cli_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(splits.heldout_identities()[: args.identities]):
        gt = ict.vertices(c, None)
        pts, nrm, _ = metrics.sample_mesh(gt, ict.faces, POINTS, i, exposed)
        scan, fitted = work / f"heldout_{i}_points.ply", work / f"heldout_{i}_fit.ply"
        write_ply(scan, pts, np.zeros((0, 3), np.int64), {"normals": nrm})
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "backend", "fit", str(scan), "-o", str(fitted), "--units", "m",
                        "--no-expression", "--resolution", str(args.resolution), "--steps", str(args.steps),
                        "--seed", str(i), "--device", args.device], cwd=ROOT, check=True)
        seconds = time.time() - t0
        mesh = read_mesh(fitted)
        if mesh.faces is None:
            raise SystemExit(f"{fitted}: the fit wrote no faces")
        m = metrics.evaluate_ict(mesh.vertices, mesh.faces, gt, ict, n=200_000, seed=i)
        rows.append({"identity": i, "cd_l1_mm": m["head"]["chamfer_l1"], "nc": m["head"]["normal_consistency"],
                     "f1mm": m["head"]["f_score@1mm"], "face_cd_l1_mm": m["face"]["chamfer_l1"],
                     "fit_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    for key in ("cd_l1_mm", "nc", "f1mm", "face_cd_l1_mm"):
        print(f"mean {key}: {np.mean([r[key] for r in rows]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
