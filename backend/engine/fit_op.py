"""The fit operation: a head fitted to a mesh or point cloud in any frame and units. The input is aligned to
the mean head (engine/align.py); its points near the mean head fit the latent codes together with the input's
pose (backend.model.inversion.fit_latents, fit_pose); its points near that fitted head then fit them again,
from there; the fitted head's mesh comes back in the input's frame with its fit error (engine/fit.py).

Two rounds because the mean head is a poor judge of inliers: a held-out ICT head aligned to it lost a fifth of
its points, all over the head, to the inlier test (weights/MODEL_CARD.md, "The fit CLI against the eval")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import constants, errors
from ..model.inversion import FitResult, fit_latents
from . import fit
from .head import HeadSpec
from .progress import OffsetProgress, Progress, check_cancel
from .requests import FitRequest
from .similarity import Similarity
from .tuning import FIT_INLIER_FLOOR_M, FIT_INLIER_MEDIANS, FIT_MIN_INLIERS, FIT_MIN_WEIGHT, FIT_TOPK, for_device

if TYPE_CHECKING:
    from .session import Session

PROGRESS_FIT_LATENTS = (0.1, 0.7)  # the latent fit's (start, span) of the op's progress; alignment starts at 0
FIT_ROUNDS = 2  # latent fits of `steps` steps: on the points near the mean head, then near the fitted head
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
    box = in_box(x_model)  # the part of the input a head model describes
    inlier = near(aligner.tree.query(x_model)[0], box)
    mean_head_inliers = float(inlier.mean())
    aligned = sim
    start, span = PROGRESS_FIT_LATENTS
    result: FitResult | None = None
    for r in range(FIT_ROUNDS):
        if result is not None:  # the points near the head just fitted, in the pose just fitted
            x_model = sim.apply(samples)
            inlier = near(np.abs(head_sdf(session, result, x_model)), in_box(x_model))
        result, sim = fit_round(session, req, samples, sample_normals, sim, inlier,
                                None if result is None else result.z_id,
                                OffsetProgress(progress, start + span * r / FIT_ROUNDS, span / FIT_ROUNDS))
    assert result is not None  # FIT_ROUNDS >= 1
    x_model = sim.apply(samples)
    box = in_box(x_model)
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
    err = fit.fit_error(x_model[box], mesh["vertices"], mesh["faces"], sim.scale)
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
                      "mean_head_inlier_fraction": mean_head_inliers, "inlier_fraction": float(inlier.mean()),
                      "in_box_fraction": float(box.mean()), "pose_refinement": pose_change(aligned, sim, samples)},
        "fit": {"steps": req.steps, "rounds": FIT_ROUNDS, "batch_points": req.batch_points,
                "normals": sample_normals is not None and req.use_normals,
                "final_loss": result.losses[-1] if result.losses else None},
    })
    return out, mesh


def in_box(x: np.ndarray) -> np.ndarray:
    """Which model-frame points (N,3) lie inside the model's canonical box."""
    return ((x > np.array(constants.BBOX_MIN)) & (x < np.array(constants.BBOX_MAX))).all(1)


def near(distance: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The input points a head fit uses: in the box and within FIT_INLIER_MEDIANS times the median distance (N,)
    to the head, or FIT_INLIER_FLOOR_M."""
    inlier = (distance <= max(FIT_INLIER_MEDIANS * float(np.median(distance)), FIT_INLIER_FLOOR_M)) & box
    if inlier.sum() < FIT_MIN_INLIERS:
        raise errors.InvalidInput("could not find a head in the input (too few points near the aligned head)")
    return inlier


def head_sdf(session: Session, fitted: FitResult, x: np.ndarray) -> np.ndarray:
    """The SDF (m) of a fitted head, posed by its fitted expression, at model-frame points x (N,3)."""
    model = session.model
    with torch.no_grad():
        field = session.point_field(fitted.zr, model.anchors(fitted.zr), session.point_drop_tol)
        posed = bool(fitted.z_exp.any())

        def sdf(c: torch.Tensor) -> torch.Tensor:
            return field.sdf(c + model.warp(c[None], fitted.z_exp, fitted.z_id)[0] if posed else c)

        xt = torch.as_tensor(x, device=session.device, dtype=torch.float32)
        return torch.cat([sdf(c) for c in xt.split(session.chunk)]).cpu().numpy().astype(np.float64)


def fit_round(session: Session, req: FitRequest, samples: np.ndarray, normals: np.ndarray | None, sim: Similarity,
              inlier: np.ndarray, init_z_id: torch.Tensor | None, progress: Progress
              ) -> tuple[FitResult, Similarity]:
    """One latent fit of the inliers with their rigid pose, from `sim` and the identity init_z_id (None: the
    mean); returns the fit and the refined similarity. The scale stays the alignment's: with the identity's own
    size it would be a second way to fit the head's size, held only by the identity prior."""
    device = session.device
    pts = torch.as_tensor(sim.apply(samples[inlier]), device=device, dtype=torch.float32)
    nrm = None
    if normals is not None and req.use_normals:
        nrm = torch.as_tensor(normals[inlier] @ sim.rotation.T, device=device, dtype=torch.float32)
    steps = req.steps

    def callback(step: int, loss: torch.Tensor) -> None:  # loss stays on the device (no sync)
        check_cancel(progress)
        if step % FIT_REPORT_EVERY == 0:
            progress.report(step / max(steps, 1), f"fitting latents: step {step}/{steps}")

    topk = for_device(FIT_TOPK, device.type) if session.topk is not None else None
    extras = session.extras
    result = fit_latents(session.model, pts, nrm, fit_expression=req.fit_expression, steps=steps,
                         id_mean=extras["id_mean"], id_chol=extras["id_chol"], topk=topk,
                         batch_points=req.batch_points, seed=req.seed, callback=callback,
                         point_ids=torch.as_tensor(np.flatnonzero(inlier)), final_abs=False, init_z_id=init_z_id,
                         fit_pose=True)
    assert result.pose is not None  # fit_pose returns it
    return result, then(sim, result.pose[0].double().cpu().numpy())


def then(sim: Similarity, pose: np.ndarray) -> Similarity:
    """`sim` followed by the rigid pose (3,4) [R | t]."""
    rot, t = pose[:, :3], pose[:, 3]
    return Similarity(sim.scale, rot @ sim.rotation, rot @ sim.translation + t)


def pose_change(before: Similarity, after: Similarity, samples: np.ndarray) -> dict:
    """How far the fit moved the aligned input: its turn (degrees) and the shift of its centroid (model metres)."""
    turn = np.clip((np.trace(after.rotation @ before.rotation.T) - 1) / 2, -1.0, 1.0)
    c = samples.mean(0)
    return {"rotation_deg": float(np.degrees(np.arccos(turn))),
            "centroid_shift_m": float(np.linalg.norm(after.apply(c[None]) - before.apply(c[None])))}
