"""Fit the known-answer clip (tools/capture_clip.py) back and print the measures (docs/capture.md):

    .venv/bin/python tools/capture_known_answer.py DIR [--device cpu|cuda] [--steps N] [--json OUT]
        [--set FIELD=VALUE ...] [--offsets landmark_offsets.json] [--seed N]

Face CD-L1 of the fitted neutral head against the rendered one, expression weight MAE over the 53 weights and
all frames (and over the five animated ones), head rotation error (absolute, and relative to the first
frame), landmark error and time per frame. `--set` changes a field of backend.capture.fit.FitSettings (e.g.
`--set silhouette_term=contour`; values are read as JSON where they parse, else as text); `--offsets` fits with
another landmark offset table (tools/calibrate_landmarks.py --out) instead of the shipped one; `--seed` the fit's
random choices (the request's seed). Not shipped."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evaluate(clip: Path, device: str = "cpu", steps: int | None = None, weights: Path | None = None,
             silhouette: bool = True, settings: dict | None = None, offsets: Path | None = None,
             seed: int | None = None) -> dict:
    from backend.capture import correspondence, metrics, op
    from backend.engine.head import HeadSpec
    from backend.engine.session import NullProgress, Session

    truth = json.loads((clip / "truth.json").read_text())
    s = Session(weights_dir=weights, device=device)
    # the clip's camera focal length, as a Blender movie clip's camera has it
    params: dict = {"path": str(clip / "clip.mp4"), "resolution": truth["resolution"],
                    "focal_px": truth["camera"]["focal_px"], "silhouette": silhouette}
    if steps is not None:
        params["steps"] = steps
    if seed is not None:  # the fit's random choices (the photometric term's skin points)
        params["seed"] = seed
    t0 = time.perf_counter()
    table = nullcontext() if offsets is None else mock.patch.object(
        op, "template_targets", partial(correspondence.template_targets, offsets=offsets))
    with table:
        out, arrays = op.run(s, params, NullProgress(), settings)
    seconds = time.perf_counter() - t0
    _, zr, k = s.decode(HeadSpec(identity=np.asarray(truth["identity"], np.float32)))
    true_mesh, _, _ = s.canonical_mesh(zr, k, truth["resolution"])
    true_exp = np.asarray(truth["expressions"], np.float32)
    true_rot = np.stack([metrics.yaw_matrix(a) for a in truth["yaw_deg"]])
    animated = np.abs(true_exp).max(0) > 0
    rot_abs = metrics.rotation_error_deg(arrays["rotations"], true_rot)
    rot_rel = metrics.rotation_error_deg(metrics.relative_rotations(arrays["rotations"]),
                                         metrics.relative_rotations(true_rot))
    cap = out["capture"]
    _, zr_fit, k_fit = s.decode(HeadSpec(identity=np.asarray(out["head"]["identity"], np.float32)))
    fit_closed, _, _ = s.canonical_mesh(zr_fit, k_fit, truth["resolution"])
    gauge = _gauge(fit_closed, true_mesh, arrays["rotations"], true_rot)
    mean_cd, mean_cd_similarity = _mean_head_cd(s, true_mesh, truth["resolution"])
    return {
        "frames": cap["frames"], "size": truth["camera"]["size"], "device": str(s.device),
        "face_cd_l1_mm": metrics.face_cd_l1_mm(arrays["vertices"], arrays["faces"], true_mesh.vertices,
                                               true_mesh.faces),
        # the fitted identity's canonical (closed) mesh, extracted as the true and mean heads are: the identity
        # alone, without what the delivered mesh's opening (neck cut, slits, largest piece) changes
        "face_cd_l1_mm_canonical": metrics.face_cd_l1_mm(fit_closed.vertices, fit_closed.faces, true_mesh.vertices,
                                                         true_mesh.faces),
        "surface_pieces_dropped": out.get("stats", {}).get("surface", {}).get("pieces_dropped"),
        "mean_head_face_cd_l1_mm": mean_cd,
        "mean_head_face_cd_l1_mm_similarity": mean_cd_similarity,
        "expression_mae": metrics.expression_mae(arrays["expressions"], true_exp),
        "expression_mae_animated": metrics.expression_mae(arrays["expressions"][:, animated], true_exp[:, animated]),
        "rotation_error_deg_mean": float(rot_abs.mean()), "rotation_error_deg_max": float(rot_abs.max()),
        "relative_rotation_error_deg_mean": float(rot_rel.mean()),
        "relative_rotation_error_deg_max": float(rot_rel.max()),
        **gauge,
        "landmark_error_px": cap["landmark_error_px"], "silhouette_iou": cap["silhouette_iou"],
        "outline_error_px": cap["outline_error_px"], "settings": settings or {},
        "offsets": str(offsets) if offsets is not None else None, "seed": seed,
        "focal_px": cap["focal_px"], "true_focal_px": truth["camera"]["focal_px"],
        "true_yaw_deg": [round(a, 2) for a in truth["yaw_deg"]],
        "fitted_yaw_deg": [round(float(np.degrees(np.arctan2(r[0, 2], r[2, 2]))), 2) for r in arrays["rotations"]],
        "animated_true_mean": true_exp[:, animated].mean(0).round(3).tolist(),
        "animated_fitted_mean": arrays["expressions"][:, animated].mean(0).round(3).tolist(),
        "largest_fitted": {s.expression_names[j]: round(float(arrays["expressions"][:, j].mean()), 3)
                           for j in np.argsort(-arrays["expressions"].mean(0))[:8]},
        "identity": [round(float(v), 5) for v in out["head"]["identity"]],
        "fit_seconds": cap["fit_seconds"], "total_seconds": seconds, "seconds_per_frame": seconds / cap["frames"],
    }


def _gauge(fitted, true, rotations: np.ndarray, true_rot: np.ndarray) -> dict:
    """What of the face and rotation errors the images cannot tell (metrics.align_face): the fitted identity's
    canonical face after the rigid and the similarity transform that best aligns it with the true one, and the
    rotation error of the head turn the true face then sees (R_t R_a^T)."""
    from backend.capture import metrics

    row: dict = {}
    for name, scale in (("rigid", False), ("similarity", True)):
        cd, (s, rot, t) = metrics.aligned_face_cd_l1_mm(fitted.vertices, fitted.faces, true.vertices, true.faces,
                                                        scale=scale)
        err = metrics.rotation_error_deg(np.einsum("tij,kj->tik", rotations.astype(np.float64), rot), true_rot)
        row[f"face_cd_l1_mm_{name}"] = cd
        row[f"{name}_align"] = {"scale": round(s, 5),
                                "angle_deg": round(float(metrics.rotation_error_deg(rot[None], np.eye(3)[None])[0]), 3),
                                "shift_mm": np.round(1e3 * t, 2).tolist()}
        row[f"rotation_error_deg_mean_{name}"] = float(err.mean())
        row[f"rotation_error_deg_max_{name}"] = float(err.max())
    return row


def _mean_head_cd(s, true_mesh, resolution: int) -> tuple[float, float]:
    """The same measure for the mean identity, as it is and after the similarity alignment: what the fit has
    to beat."""
    from backend.capture import metrics
    from backend.engine.head import HeadSpec

    _, zr, k = s.decode(HeadSpec(identity=s.extras["id_mean"].cpu().numpy().astype(np.float32)))
    mean_mesh, _, _ = s.canonical_mesh(zr, k, resolution)
    return (metrics.face_cd_l1_mm(mean_mesh.vertices, mean_mesh.faces, true_mesh.vertices, true_mesh.faces),
            metrics.aligned_face_cd_l1_mm(mean_mesh.vertices, mean_mesh.faces, true_mesh.vertices, true_mesh.faces,
                                          scale=True)[0])


def _setting(item: str) -> tuple[str, object]:
    from backend.capture.fit import FitSettings

    name, sep, text = item.partition("=")
    if not sep or name not in FitSettings.__dataclass_fields__:
        raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with a FitSettings field")
    try:
        return name, json.loads(text)
    except json.JSONDecodeError:
        return name, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-silhouette", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--offsets", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    settings = dict(_setting(item) for item in args.set)
    result = evaluate(args.clip, args.device, args.steps, args.weights, not args.no_silhouette, settings,
                      args.offsets, args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
