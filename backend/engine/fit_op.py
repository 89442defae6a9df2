"""The fit operation: a head fitted to a mesh or point cloud in any frame and units. The input is aligned to
the mean head (engine/align.py), its inliers fit the latent codes (backend.model.inversion.fit_latents), and
the fitted head's mesh comes back in the input's frame with its fit error (engine/fit.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import constants, errors
from ..model.inversion import fit_latents
from . import fit
from .head import HeadSpec
from .progress import OffsetProgress, Progress, check_cancel
from .requests import FitRequest
from .tuning import FIT_INLIER_FLOOR_M, FIT_INLIER_MEDIANS, FIT_MIN_INLIERS, FIT_MIN_WEIGHT, FIT_TOPK, for_device

if TYPE_CHECKING:
    from .session import Session

PROGRESS_FIT_LATENTS = (0.1, 0.7)  # the latent fit's (start, span) of the op's progress; alignment starts at 0
PROGRESS_FIT_MESH = (0.8, 0.2)  # the fitted head's mesh: (start, span)
FIT_REPORT_EVERY = 10  # latent-fit steps between progress reports


def fit_head(session: Session, params: dict, arrays: dict, progress: Progress) -> tuple[dict, dict]:
    device = session.device
    req = FitRequest.parse(params, arrays, device.type, session.region_names, session.atlas.anchors,
                           session.atlas.vertices)
    rng = np.random.default_rng(req.seed)

    progress.report(0.0, "aligning")
    samples, sample_normals = fit.input_samples(req.points.astype(np.float64), req.faces, req.normals, req.samples,
                                                rng)
    aligner = session.aligner
    sim, align_stats = aligner.align(samples, sample_normals, fixed_scale=req.fixed_scale, landmarks=req.landmarks,
                                     seed=req.seed)
    check_cancel(progress)
    fit.check_head_coverage(align_stats.coverage)
    x_model = sim.apply(samples)
    d_f, _ = aligner.tree.query(x_model)
    lo, hi = np.array(constants.BBOX_MIN), np.array(constants.BBOX_MAX)
    in_box = ((x_model > lo) & (x_model < hi)).all(1)  # the part of the input a head model describes
    inlier = (d_f <= max(FIT_INLIER_MEDIANS * float(np.median(d_f)), FIT_INLIER_FLOOR_M)) & in_box
    if inlier.sum() < FIT_MIN_INLIERS:
        raise errors.InvalidInput("could not find a head in the input (too few points near the aligned mean head)")
    pts = torch.as_tensor(x_model[inlier], device=device, dtype=torch.float32)
    nrm = None
    if sample_normals is not None and req.use_normals:
        n_model = sample_normals[inlier] @ sim.rotation.T
        nrm = torch.as_tensor(n_model, device=device, dtype=torch.float32)

    steps = req.steps
    start, span = PROGRESS_FIT_LATENTS

    def callback(step: int, loss: torch.Tensor) -> None:  # loss stays on the device (no sync)
        check_cancel(progress)
        if step % FIT_REPORT_EVERY == 0:
            progress.report(start + span * step / max(steps, 1), f"fitting latents: step {step}/{steps}")

    topk = for_device(FIT_TOPK, device.type) if session.topk is not None else None
    extras = session.extras
    result = fit_latents(session.model, pts, nrm, fit_expression=req.fit_expression, steps=steps,
                         id_mean=extras["id_mean"], id_chol=extras["id_chol"], topk=topk,
                         batch_points=req.batch_points, seed=req.seed, callback=callback,
                         point_ids=torch.as_tensor(np.flatnonzero(inlier)), final_abs=False)
    weights = result.z_exp[0].cpu().numpy()
    head = HeadSpec(identity=result.z_id[0].cpu().numpy().astype(np.float32),
                    expression={n: float(w) for n, w in zip(session.expression_names, weights) if w >= FIT_MIN_WEIGHT})
    check_cancel(progress)
    # the fit error compares the mesh as extracted (not opened, engine/open_surface.py) with the whole input
    # inside the box, which the neck cut would leave partly uncovered; the head returned is opened like a
    # generated one (its mouth opens), at the cost of a second extraction
    opened, session.open_surfaces = session.open_surfaces, False
    try:
        out, mesh = session.head_mesh(head, req.resolution, OffsetProgress(progress, *PROGRESS_FIT_MESH))
    finally:
        session.open_surfaces = opened
    # measured on the input inside the model's box (a figure's body is not what the head model describes)
    err = fit.fit_error(x_model[in_box], mesh["vertices"], mesh["faces"], sim.scale)
    fit.check_fit_error(err.trimmed_mm)
    if opened:
        check_cancel(progress)
        out, mesh = session.head_mesh(head, req.resolution, OffsetProgress(progress, *PROGRESS_FIT_MESH))
    mesh["vertices"] = sim.inverse(mesh["vertices"].astype(np.float64)).astype(np.float32)
    mesh["normals"] = (mesh["normals"] @ sim.rotation).astype(np.float32)
    out.update({
        "error": err.to_dict(),
        "transform": sim.to_dict(),  # x_model = scale * rotation @ x_input + translation
        "alignment": {"score_m": align_stats.score, "forward_median_m": align_stats.forward_median,
                      "coverage_m": align_stats.coverage, "hypotheses": align_stats.hypotheses,
                      "inlier_fraction": float(inlier.mean()), "in_box_fraction": float(in_box.mean())},
        "fit": {"steps": steps, "batch_points": req.batch_points, "normals": nrm is not None,
                "final_loss": result.losses[-1] if result.losses else None},
    })
    return out, mesh
