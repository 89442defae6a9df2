"""Calibrate where MediaPipe's landmarks sit on the template (docs/capture.md): on clips of generated heads with
known answers (tools/capture_clip.py), find per landmark the template point whose surface point, posed by
the true identity, expressions and head pose, projects onto MediaPipe's detections:

    .venv/bin/python tools/capture_clip.py --out DIR_n --seed n        (several seeds, not the test's)
    .venv/bin/python tools/calibrate_landmarks.py DIR_1 DIR_2 ... [--out backend/capture/landmark_offsets.json]
        [--prior 1e-3]

MediaPipe's points are not exactly the ICT vertices the Multi-PIE markup maps them to (its brows sit lower,
its eye corners higher); the fit would otherwise bend the identity to absorb that. The offsets are template
coordinates (identity-free), one 3D vector per landmark shared by every head, pose and expression. Not
shipped; its output is."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the known-answer clips' heads (tests/test_capture_known_answer.py, docs/capture.md; 21-23 since 2026-12-07's
# fourth session): never calibrated on
EVALUATION_SEEDS = (5, 11, 21, 22, 23)
STEPS = 200
LR = 2e-4  # m per Adam step
PRIOR = 1e-3  # weight of |offset / 1 cm|^2 (per landmark, mean): keeps directions the views do not see at 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "backend" / "capture" / "landmark_offsets.json")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--prior", type=float, default=PRIOR, help=f"the offsets' prior weight (default {PRIOR})")
    args = parser.parse_args()

    import torch

    from backend.capture import landmarks, media, metrics
    from backend.capture.camera import project
    from backend.capture.correspondence import USED, template_vertices
    from backend.capture.fit import FitSettings, _Problem
    from backend.engine.session import Session

    s = Session(weights_dir=args.weights, device="cpu")
    base = torch.as_tensor(s.atlas.vertices[template_vertices()], dtype=torch.float32)
    problems = []
    for clip in args.clips:
        truth = json.loads((clip / "truth.json").read_text())
        if truth["seed"] in EVALUATION_SEEDS:
            raise SystemExit(f"{clip}: seed {truth['seed']} is a known-answer clip's head")
        footage = media.load_footage(str(clip / "clip.mp4"), max_frames=600)
        points, found = landmarks.detect(footage.frames, footage.is_video)
        points = landmarks.fill_gaps(points, found)
        if footage.fps >= landmarks.SMOOTH_MIN_FPS:  # as the fit's input (op.fit_tracked)
            points = landmarks.smooth(points)
        T, H, W, _ = footage.frames.shape
        p = _Problem(s.model, s.extras, base.numpy(), landmarks.fit_landmarks(points), found, None, W, H, True,
                     FitSettings())
        z = torch.as_tensor(np.asarray(truth["identity"], np.float32))[None]
        e = torch.as_tensor(np.asarray(truth["expressions"], np.float32))
        rot = torch.as_tensor(np.stack([metrics.yaw_matrix(a) for a in truth["yaw_deg"]]), dtype=torch.float32)
        trans = torch.tensor([[0.0, 0.0, -truth["camera"]["distance_m"]]]).repeat(T, 1)
        focal = torch.tensor([truth["camera"]["focal_px"]])
        problems.append((clip, p, z, e, rot, trans, focal))

    offset = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=LR)

    def errors() -> list[float]:
        out = []
        with torch.no_grad():
            for _, p, z, e, rot, trans, focal in problems:
                p.targets = base + offset
                for _ in range(3):  # the solves start from the last step's points: let them settle
                    x = p.landmarks(z, e)
                pix = project(x, rot, trans, focal, p.width, p.height)
                out.append(float((pix - p.obs).norm(dim=-1)[p.frame_w > 0].mean()))
        return out

    before = errors()
    for step in range(STEPS):
        opt.zero_grad()
        loss = args.prior * (offset / 0.01).square().sum(-1).mean()
        for _, p, z, e, rot, trans, focal in problems:
            p.targets = base + offset
            loss = loss + p.landmark_loss(project(p.landmarks(z, e), rot, trans, focal, p.width, p.height))
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {float(loss.detach()):.5f}", flush=True)
    after = errors()
    for (clip, *_), b, a in zip(problems, before, after):
        print(f"{clip}: true head's landmark error {b:.2f} px -> {a:.2f} px with the offsets")
    values = offset.detach().numpy().astype(np.float64)
    args.out.write_text(json.dumps({
        "about": "template-space offsets (m) of MediaPipe's landmarks from their ICT vertices, Multi-PIE index "
                 "-> [x, y, z]; written by tools/calibrate_landmarks.py",
        "clips": [f"seed {json.loads((c / 'truth.json').read_text())['seed']}" for c, *_ in problems],
        "offsets": {str(i): [round(float(v), 5) for v in values[k]] for k, i in enumerate(USED)},
    }, indent=1) + "\n")
    print(f"wrote {args.out}: mean |offset| {1e3 * np.linalg.norm(values, axis=1).mean():.2f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
