"""Fit one identity, per-frame expression weights, per-frame head pose and the camera's focal length to 2D
landmarks and (where the background is plain) the silhouette, IMavatar-style (docs/capture.md).

Unknowns: whitened identity u (z_id = id_mean + id_chol u, prior |u|^2 / 256), expression weights e_t in
[0, 1] (L1 prior), axis-angle r_t and translation t_t, log focal (videos only: a photo cannot tell focal
length from distance, so it keeps the estimate). Two stages: the pose alone against the mean head's template
landmarks (no network), then everything through the network:
- landmarks: each used ICT vertex's point on this identity's surface (template(x) = vertex, sdf(x) = 0, by
  Gauss-Newton) is carried through the inverse of the backward expression warp to frame t's posed head
  (x_p + warp(x_p) = x_c), projected and compared with the detection; both solves get their gradients by
  implicit differentiation at the solution (surface.attach), as IMavatar's root finding does;
- silhouette, one of two terms: "rays": rays through a jittered pixel grid per frame are sphere-traced
  against the posed SDF; where the traced hit and the foreground mask disagree, the SDF at the ray's closest
  approach is pushed through a binary cross-entropy on sigmoid(-sdf / 1 mm) (IMavatar's mask loss);
  "contour": points of the posed head's occluding contour, found from fixed rays along the mask's outline and
  attached by implicit differentiation, against the outline's distance transform (contour.py);
- photometric (videos): skin points spread over the face, found and carried to each frame as the landmarks
  are, must show the same colour in consecutive frames (photometric.py);
- temporal: squared second differences of pose and expressions (videos); optionally squared first
  differences of the camera distance (FitSettings.distance_prior).
All frames are batched; everything runs on the model's device."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..model.inversion import CodeAdam
from . import contour, photometric, surface
from .camera import pixel_rays, project, rotvec_to_matrix
from .correspondence import WEIGHTS, USED

FIT_TOPK = None  # all 39 local networks inside the fit: for the few hundred points per step the dense batched
# products run faster on CPU than the per-region loop of ImHead's top-k path
TRACE_TOPK = 8  # while marching rays (no graph; the hit is re-evaluated with FIT_TOPK)
HEAD_CENTRE = (0.0, 0.0, 0.02)  # model frame; the bounding sphere of the traced region
HEAD_RADIUS = 0.2
# model-frame height (m; the chin is at -0.076) below which rays are left out of the silhouette: where the
# model's neck is cut and a body's shoulders or clothes begin, the outline is not the model's surface
NECK_Y = -0.12
SIL_SOFTNESS = 1e-3  # m: sigmoid(-sdf / softness) is the predicted coverage of a ray
EYE_OUTER = (USED.index(36), USED.index(45))
# steps between fresh Jacobians of the landmark solves (chord steps in between). On the known-answer clip
# (docs/capture.md) 8 let the expression solve diverge (landmark error 35 px): fresh every step.
JACOBIAN_EVERY = 1
# outline search (contour.py): a ray's closest approach counts as edge-on from this far inside the surface to
# this far outside (m; deeper inside, the chord's minimum is not the outline's); steps along the outline's
# normal are clipped (px), and the rays stay within CONTOUR_REACH px of the mask's outline
CONTOUR_INSIDE = 3e-3
CONTOUR_OUTSIDE = 6e-3
CONTOUR_STEP = 6.0
CONTOUR_REACH = 24.0
# The pixel constants here, in contour.py and photometric.py were chosen on footage whose outer eye corners lie
# about this many pixels apart (the 192-pixel known-answer clips, docs/capture.md); footage that shows the face
# larger scales them with it (never below one pixel), so a term weighs the same at any resolution
REFERENCE_EYE_PX = 45.0


@dataclass
class FitSettings:
    steps: int = 120  # network stage
    pose_steps: int = 300
    silhouette: bool = True
    # "contour": the occluding contour against the mask's outline (contour.py); "rays": IMavatar's mask loss on
    # random traced rays. The contour and its weight were chosen on the known-answer clips (docs/capture.md)
    silhouette_term: Literal["rays", "contour"] = "contour"
    contour_weight: float = 1.0  # 1: an outline pixel costs half a landmark pixel (contour.loss)
    contour_points: int = 64  # outline anchors per frame
    contour_fits_identity: bool = True  # the outline reaches the identity (unlike the other image terms)
    rays_per_side: int = 16  # silhouette rays per frame: a jittered grid over the head's box
    silhouette_frames: int = 8  # frames traced per trace (a random subset)
    trace_every: int = 4  # steps between traces; in between the same rays' closest approaches are re-evaluated
    focal_px: float | None = None  # known focal length; None: estimated (videos) or 1.2 x the longer side
    id_prior: float = 1e-2
    # Adam rate of the whitened identity (one shared scale per code: each step moves |u| by about this times
    # 16); chosen on the known-answer clip of seed 5, checked on seed 11 (docs/capture.md)
    id_lr: float = 0.01
    exp_l1: float = 3e-4  # per unit of summed weights in a frame: a weight of 1 costs a ~2% eye-distance miss
    # 0: the expression prior is exp_l1 times the weights' sum (L1); > 0: exp_l1 times the sum of
    # eps log(1 + e / eps) (expression_prior), as steep as the L1 at 0, so small spurious weights are still
    # held at zero, but a weight e is pulled by only eps / (eps + e) of the L1's force: the L1 shrinks large
    # true weights such as the jaw's opening (docs/capture.md)
    exp_log_eps: float = 0.0
    temporal: float = 0.01  # at 6 fps a +-30 degree turn's own second differences cost ~4e-5
    # weight of the squared first differences of the camera distance in cm (videos, both stages;
    # distance_prior); 0: off. The landmarks let the distance follow the jaw's opening by centimetres; the
    # prior holds it for a subject who stays at one distance, but it did not improve both known-answer clips,
    # so it is off by default (docs/capture.md)
    distance_prior: float = 0.0
    silhouette_weight: float = 0.01  # 0.03 diverged on the known-answer clip (docs/capture.md)
    # per-landmark offsets on the neutral head shared by all frames (MediaPipe's points do not sit exactly on
    # the ICT vertices they are mapped to): prior weight on |offset / 1 cm|^2; 0: no offsets
    landmark_bias: float = 0.0
    photometric: float = 0.05  # weight of the photometric term (videos; 0: off)
    photo_points: int = 256  # skin points of the photometric term
    # "colour": each skin point's colour in consecutive frames (Charbonnier); "patch": the normalised
    # correlation of a photo_patch x photo_patch grid of skin about each point (photo_spacing m apart) between
    # frames up to photo_lags apart (photometric.patch_ncc_loss; weight ~0.03). The patch term lowered the
    # face error slightly but left one known-answer clip's pose in one of two minima by the skin points' draw,
    # so it is not the default (docs/capture.md)
    photo_term: Literal["colour", "patch"] = "colour"
    photo_patch: int = 5
    photo_spacing: float = 1.5e-3
    photo_lags: int = 3
    # whether the silhouette and photometric terms move the identity too (the contour term has its own switch);
    # False: the identity follows the landmarks, the contour and its prior, the image terms fit pose and
    # expressions. On the 192-px featureless clips their identity gradients pulled the code away from the true
    # head; on 512-px clips with a face's features the photometric term's (256 points) helps the shape and the
    # pose (docs/capture.md, 2026-12-08)
    image_terms_fit_identity: bool = True
    # the returned identity is the mean of the identity's iterates from this fraction of the network stage on
    # (1: the last iterate): the random silhouette rays and Adam's steps keep it moving about its optimum
    id_average_from: float = 0.5
    # the network stage's learning rates fall along a cosine to this fraction: Adam's steps stay near the rate
    # however small the gradient, so without it the pose keeps stepping around the optimum to the end
    anneal_to: float = 1.0
    seed: int = 0


@dataclass
class CaptureFit:
    z_id: np.ndarray  # (256,)
    expressions: np.ndarray  # (T, 53)
    rotation: np.ndarray  # (T, 3, 3) model -> camera
    translation: np.ndarray  # (T, 3) m
    focal_px: float
    observed: np.ndarray  # (T, L, 2) px
    projected: np.ndarray  # (T, L, 2) px, the fitted head's landmarks
    landmark_error_px: float  # mean over frames with a face
    silhouette_iou: float | None
    outline_error_px: float | None  # the contour term's mean distance to the mask's outline
    seconds: float
    losses: list[float]


Report = Callable[[float, str], None]  # may raise errors.Cancelled


class _Problem:
    def __init__(self, model, extras: dict, targets: np.ndarray, observed: np.ndarray, found: np.ndarray,
                 masks: np.ndarray | None, width: int, height: int, video: bool, settings: FitSettings,
                 images: np.ndarray | None = None, skin: np.ndarray | None = None):
        dev = next(model.parameters()).device
        self.model, self.dev, self.settings = model, dev, settings
        self.width, self.height, self.video = width, height, video
        self.T = len(observed)
        self.id_mean = extras["id_mean"].to(dev, torch.float32)
        self.id_chol = extras["id_chol"].to(dev, torch.float32)
        self.L = len(targets)
        # landmark template points (L,3), then the photometric term's skin points (P,3): solved together
        self.photo = images is not None and skin is not None and len(skin) > 0 and len(observed) > 1
        both = np.concatenate([targets, skin]) if self.photo and skin is not None else targets
        self.targets = torch.as_tensor(both, dtype=torch.float32, device=dev)
        self.obs = torch.as_tensor(observed, dtype=torch.float32, device=dev)
        self.frame_w = torch.as_tensor(found, dtype=torch.float32, device=dev)
        self.lm_w = torch.as_tensor(WEIGHTS, device=dev)
        eyes = (self.obs[:, EYE_OUTER[0]] - self.obs[:, EYE_OUTER[1]]).norm(dim=-1)
        self.scale = float(eyes[self.frame_w > 0].median())  # px: landmark residuals in eye distances
        self.px = max(1.0, self.scale / REFERENCE_EYE_PX)  # footage pixels per reference pixel
        self.images = (photometric.prepare(images, dev, photometric.BLUR_PX * self.px)
                       if self.photo and images is not None else None)
        self.masks = None if masks is None else torch.as_tensor(masks, device=dev)
        self.gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.can_ok: Tensor | None = None  # (N,) points whose canonical solve met the surface
        self.x_can: Tensor | None = None  # warm starts of the solves
        self.x_pose: Tensor | None = None
        self.J_can: Tensor | None = None
        self.J_pose: Tensor | None = None
        self.calls = 0
        self.box = _box(masks) if masks is not None and masks.any() else None  # silhouette rays' pixel box
        self.outline: tuple[Tensor, Tensor, Tensor] | None = None  # contour points, their SDF gradients, weights
        self.outline_px: float | None = None
        if masks is not None and masks.any() and settings.silhouette_term == "contour":
            dist = contour.signed_distance(masks)
            pos, nrm, ok = contour.outline_anchors(masks, dist, settings.contour_points, self.px)
            self.distance = torch.as_tensor(dist, device=dev)
            self.anchor = torch.as_tensor(pos, device=dev)
            self.anchor_normal = torch.as_tensor(nrm, device=dev)
            self.anchor_ok = torch.as_tensor(ok, device=dev) & (self.frame_w[:, None] > 0)
            self.anchor_offset = torch.zeros(ok.shape, device=dev)  # px along the normal: the search's warm start
            self.anchor_s: Tensor | None = None  # distance along each anchor's ray to its closest approach

    # ------------------------------------------------------------------ landmarks
    def landmarks(self, z: Tensor, e: Tensor, bias: Tensor | None = None) -> Tensor:
        """Posed landmark points (T, L, 3), then the skin points (T, P, 3) where the photometric term is on, with
        implicit-differentiation gradients to z and e."""
        m = self.model
        zr, k = m.decode(z)
        zr_d, k_d = zr.detach(), k.detach()

        def canon_res(x: Tensor, zr: Tensor = zr_d, k: Tensor = k_d) -> Tensor:
            feat = m.features(x, zr, k, FIT_TOPK)
            sdf = m.sdf_from_features(x, feat)
            return torch.cat([m.template_from_features(x, feat) - self.targets, sdf[..., None]], -1)

        fresh = self.calls % JACOBIAN_EVERY == 0
        self.calls += 1
        if self.x_can is None or self.J_can is None:
            self.x_can, self.J_can = surface.gauss_newton(canon_res, self.targets[None], iters=4)
        elif fresh:
            self.x_can, self.J_can = surface.gauss_newton(canon_res, self.x_can, iters=1)
        else:
            self.x_can = surface.chord(canon_res, self.x_can, self.J_can)
        live = canon_res(self.x_can, zr, k)
        self.can_ok = live.detach()[0].norm(dim=-1) < 1e-3  # a point off the surface or the template: not used
        x_c = surface.attach(self.x_can, self.J_can, live)  # (1, N, 3)
        if bias is not None:  # (1, L, 3): moves the landmarks, not the skin points
            x_c = torch.cat([x_c[:, : self.L] + bias, x_c[:, self.L:]], 1)

        T = self.T
        zt_d, e_d = z.detach().expand(T, -1), e.detach()
        xc_d = x_c.detach().expand(T, -1, -1)

        def pose_res(x: Tensor, e: Tensor = e_d, zt: Tensor = zt_d, xc: Tensor = xc_d) -> Tensor:
            return x + m.warp(x, e, zt) - xc

        if self.x_pose is None or self.J_pose is None:
            with torch.no_grad():
                x0 = xc_d - m.warp(xc_d, e_d, zt_d)
            self.x_pose, self.J_pose = surface.gauss_newton(pose_res, x0, iters=2)
        elif fresh:
            self.x_pose, self.J_pose = surface.gauss_newton(pose_res, self.x_pose, iters=1)
        else:
            self.x_pose = surface.chord(pose_res, self.x_pose, self.J_pose)
        if self.settings.image_terms_fit_identity or not self.photo:
            live = pose_res(self.x_pose, e, z.expand(T, -1), x_c.expand(T, -1, -1))
        else:  # the skin points follow the identity found by the landmarks; their terms move only pose and
            # expressions (the residual is pointwise: the two groups' rows are computed apart)
            L = self.L
            live = torch.cat([pose_res(self.x_pose[:, :L], e, z.expand(T, -1), x_c[:, :L].expand(T, -1, -1)),
                              pose_res(self.x_pose[:, L:], e, zt_d, xc_d[:, L:])], 1)
        return surface.attach(self.x_pose, self.J_pose, live)

    def landmark_loss(self, pixels: Tensor) -> Tensor:
        r2 = ((pixels[:, : self.L] - self.obs) / self.scale).square().sum(-1)  # (T, L)
        w = self.frame_w[:, None] * self.lm_w[None]
        return (w * r2).sum() / w.sum()

    # ------------------------------------------------------------------ photometric
    def photometric_loss(self, points: Tensor, rot: Tensor, trans: Tensor, focal: Tensor) -> Tensor:
        """Photo-consistency of the skin points (points[:, L:]) between consecutive frames (photometric.py)."""
        assert self.images is not None and self.J_can is not None and self.can_ok is not None
        skin = points[:, self.L:]
        pix = project(skin, rot, trans, focal, self.width, self.height)
        normals = self.J_can[:, self.L:, 3]  # d sdf / dx at the canonical point: the outward normal
        w = photometric.visibility(normals, skin.detach(), rot.detach(), trans.detach())
        with torch.no_grad():
            inside = ((pix[..., 0] > 1) & (pix[..., 0] < self.width - 1) & (pix[..., 1] > 1)
                      & (pix[..., 1] < self.height - 1))
        w = w * inside * self.frame_w[:, None] * self.can_ok[None, self.L:]
        if self.settings.photo_term == "colour":
            return photometric.consistency_loss(photometric.sample(self.images, pix), w)
        cfg = self.settings
        offsets = photometric.patch_offsets(normals, cfg.photo_patch, cfg.photo_spacing)  # (1, P, S, 3)
        patch = skin[:, :, None] + offsets  # (T, P, S, 3): carried rigidly with the skin point
        T, P, S, _ = patch.shape
        ppix = project(patch.reshape(T, P * S, 3), rot, trans, focal, self.width, self.height)
        colours = photometric.sample(self.images, ppix).reshape(T, P, S, 3)
        return photometric.patch_ncc_loss(colours, w, cfg.photo_lags)

    # ------------------------------------------------------------------ silhouette
    def trace(self, z: Tensor, e: Tensor, rot: Tensor, trans: Tensor, focal: Tensor) -> float:
        """Sphere-trace a jittered pixel grid on a random subset of frames (no graph); keeps the rays where the
        trace and the mask disagree for silhouette_loss. Returns the traced rays' IoU with the mask."""
        assert self.masks is not None and self.box is not None
        s = self.settings
        cand = torch.nonzero(self.frame_w > 0)[:, 0].cpu()
        pick = cand[torch.randperm(len(cand), generator=self.gen)[: s.silhouette_frames]].to(self.dev)
        n, F = s.rays_per_side, len(pick)
        ys, xs = self.box
        gy = (torch.arange(n, dtype=torch.float32)[:, None] + torch.rand(F, n, n, generator=self.gen)) / n
        gx = (torch.arange(n, dtype=torch.float32)[None, :] + torch.rand(F, n, n, generator=self.gen)) / n
        px = torch.stack([xs[0] + gx * (xs[1] - xs[0]), ys[0] + gy * (ys[1] - ys[0])], -1)
        px = px.view(F, n * n, 2).to(self.dev)
        iy = px[..., 1].long().clamp(0, self.height - 1)
        ix = px[..., 0].long().clamp(0, self.width - 1)
        inside = self.masks[pick[:, None], iy, ix]  # (F, N)
        with torch.no_grad():
            zr, k = self.model.decode(z)
            origin, direction = pixel_rays(px, rot[pick], trans[pick], focal, self.width, self.height)
            origin = origin.expand_as(direction)
            meets, near, far = surface.ray_sphere(origin, direction, torch.tensor(HEAD_CENTRE, device=self.dev),
                                                  HEAD_RADIUS)
            hit, s_best, _ = surface.sphere_trace(
                lambda x: self._posed_sdf(x, TRACE_TOPK, z.expand(F, -1), e[pick], zr.expand(F, -1, -1),
                                          k.expand(F, -1, -1)), origin, direction, near, far)
            hit = hit & meets
            on_head = (origin + s_best[..., None] * direction)[..., 1] > NECK_Y
            inside_h, hit_h = inside & on_head, hit & on_head
            iou = float((hit_h & inside_h).sum() / (hit_h | inside_h).sum().clamp_min(1))
        wrong = (hit != inside) & meets & on_head
        self.rays = (pick, px, s_best, inside.float(), wrong)
        return iou

    def _posed_sdf(self, x: Tensor, topk: int | None, z: Tensor, e: Tensor, zr: Tensor, k: Tensor) -> Tensor:
        m = self.model
        return m.sdf(x + m.warp(x, e, z), zr, k, topk)

    def find_contour(self, z: Tensor, e: Tensor, rot: Tensor, trans: Tensor, focal: Tensor, iters: int) -> None:
        """Contour points of every frame's posed head (no graph), one per outline anchor: each anchor's ray is
        moved along the outline's normal by the pixels its closest approach misses the surface by (a secant
        step with the known slope focal / distance), then that closest approach is moved onto the surface
        along the normal (contour.py). The rays are sphere-traced the first time only; later searches look for
        the closest approach near the last one's (the pose and the shape move little between searches)."""
        T = self.T
        with torch.no_grad():
            zr, k = self.model.decode(z)
            zt, zr_t, k_t = z.expand(T, -1), zr.expand(T, -1, -1), k.expand(T, -1, -1)

            def posed(x: Tensor, topk: int | None = TRACE_TOPK) -> Tensor:  # (T, ..., 3) -> (T, ...)
                return self._posed_sdf(x.reshape(T, -1, 3), topk, zt, e, zr_t, k_t).view(x.shape[:-1])

            centre = torch.tensor(HEAD_CENTRE, device=self.dev)
            for _ in range(iters):
                px = self.anchor + self.anchor_offset[..., None] * self.anchor_normal
                origin, direction = pixel_rays(px, rot, trans, focal, self.width, self.height)
                origin = origin.expand_as(direction)
                meets, near, far = surface.ray_sphere(origin, direction, centre, HEAD_RADIUS)
                if self.anchor_s is None:
                    _, s0, _ = surface.sphere_trace(posed, origin, direction, near, far)
                    s, gap = contour.closest_approach(posed, origin, direction, s0)
                else:
                    s, gap = contour.closest_approach(posed, origin, direction, self.anchor_s, 0.01, 0.01, 9)
                self.anchor_s = s
                step = (gap * focal / s.clamp_min(1e-3)).clamp(-CONTOUR_STEP * self.px, CONTOUR_STEP * self.px)
                self.anchor_offset = (self.anchor_offset - step).clamp(-CONTOUR_REACH * self.px,
                                                                       CONTOUR_REACH * self.px)
        x0 = origin + s[..., None] * direction
        g, J = surface.residual_and_jacobian(lambda x: posed(x, FIT_TOPK)[..., None], x0)
        grad = J[..., 0, :]
        x_star = contour.attach(x0, grad, g[..., 0])
        with torch.no_grad():
            pix = project(x_star, rot, trans, focal, self.width, self.height)
            framed = ((pix > 2).all(-1) & (pix[..., 0] < self.width - 2) & (pix[..., 1] < self.height - 2))
            use = (meets & self.anchor_ok & framed & (gap > -CONTOUR_INSIDE) & (gap < CONTOUR_OUTSIDE)
                   & (x_star[..., 1] > NECK_Y) & torch.isfinite(x_star).all(-1))
        self.outline = (torch.where(use[..., None], x_star, x0), grad, use.float())

    def contour_loss(self, z: Tensor, e: Tensor, rot: Tensor, trans: Tensor, focal: Tensor) -> Tensor:
        """The last search's contour points, re-attached to the current codes and expressions by implicit
        differentiation and posed, against the mask's outline (contour.loss)."""
        assert self.outline is not None
        x_star, grad, w = self.outline
        T = self.T
        zr, k = self.model.decode(z)
        live = self._posed_sdf(x_star, FIT_TOPK, z.expand(T, -1), e, zr.expand(T, -1, -1), k.expand(T, -1, -1))
        pix = project(contour.attach(x_star, grad, live), rot, trans, focal, self.width, self.height)
        d = contour.sample(self.distance, pix)
        with torch.no_grad():
            self.outline_px = float((d.abs() * w).sum() / w.sum().clamp_min(1))
        return contour.loss(d, w, self.scale, self.px)

    def silhouette_loss(self, z: Tensor, e: Tensor, rot: Tensor, trans: Tensor, focal: Tensor) -> Tensor:
        """IMavatar's mask loss on the last trace's rays where the trace and the mask disagree, at each ray's
        closest approach to the surface, which moves with the current pose."""
        pick, px, s_best, target, wrong = self.rays
        if not bool(wrong.any()):
            return torch.zeros((), device=self.dev)
        F = len(pick)
        origin, direction = pixel_rays(px, rot[pick], trans[pick], focal, self.width, self.height)
        x = origin + s_best[..., None] * direction
        zr, k = self.model.decode(z)
        f = self._posed_sdf(x, FIT_TOPK, z.expand(F, -1), e[pick], zr.expand(F, -1, -1), k.expand(F, -1, -1))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(-f / SIL_SOFTNESS, target, reduction="none")
        return (bce * wrong).sum() / wrong.sum()


def _box(masks: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pixel box (y range, x range) around every frame's foreground, grown by 10%."""
    any_mask = masks.any(0)
    ys, xs = np.nonzero(any_mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = 0.1 * (y1 - y0), 0.1 * (x1 - x0)
    h, w = any_mask.shape
    return (max(0.0, y0 - gy), min(float(h), y1 + gy)), (max(0.0, x0 - gx), min(float(w), x1 + gx))


class _Adam:
    """One CodeAdam (inversion.py: no torch.optim import, one second moment per code vector) per learning rate."""

    def __init__(self, groups: list[tuple[Tensor, float]], anneal_steps: int = 0, anneal_to: float = 1.0):
        self.opts = [CodeAdam([param], lr, cosine_steps=anneal_steps, lr_min=anneal_to * lr) for param, lr in groups]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()

    def step(self) -> None:
        for o in self.opts:
            o.step()


def expression_prior(e: Tensor, eps: float) -> Tensor:
    """Per-frame sparsity prior of the expression weights e (T, 53) in [0, 1], mean over frames: their sum (L1)
    for eps = 0, else the sum of eps log(1 + e / eps) (a log penalty, iteratively reweighted L1's objective):
    slope 1 at 0 like the L1, eps / (eps + e) at e."""
    w = e.abs()
    if eps > 0:
        w = eps * torch.log1p(w / eps)
    return w.sum(-1).mean()


def distance_prior(trans: Tensor) -> Tensor:
    """Mean squared first difference of the camera distance (the translation's z, m) in cm between consecutive
    frames: a head does not approach the camera by centimetres while it opens its mouth, but the landmarks of
    an opening jaw look like a nearer face."""
    return ((trans[1:, 2] - trans[:-1, 2]) / 0.01).square().mean() if len(trans) > 1 else trans.new_zeros(())


def _second_difference(a: Tensor) -> Tensor:
    return (a[2:] - 2 * a[1:-1] + a[:-2]).square().mean() if len(a) > 2 else a.new_zeros(())


def fit_capture(model, extras: dict, targets: np.ndarray, observed: np.ndarray, found: np.ndarray,
                masks: np.ndarray | None, width: int, height: int, video: bool, settings: FitSettings,
                report: Report, images: np.ndarray | None = None, skin: np.ndarray | None = None) -> CaptureFit:
    """targets (L,3): the template points of the landmarks; observed (T,L,2) px; found (T,) bool; images
    (T,H,W,3) uint8 and skin (P,3) template points for the photometric term (used where its weight > 0)."""
    t0 = time.perf_counter()
    if settings.photometric <= 0:
        images = skin = None
    elif images is not None and images.shape[:3] != (len(observed), height, width):
        raise ValueError(f"images {images.shape} do not match {len(observed)} frames of {width}x{height}")
    p = _Problem(model, extras, targets, observed, found, masks, width, height, video, settings, images, skin)
    dev, T = p.dev, p.T
    use_sil = settings.silhouette and masks is not None and bool(masks.any())
    use_contour = use_sil and settings.silhouette_term == "contour"
    use_rays = use_sil and not use_contour
    fit_focal = video and settings.focal_px is None
    focal0 = settings.focal_px or 1.2 * max(width, height)
    log_f = torch.tensor([math.log(focal0)], device=dev, requires_grad=fit_focal)
    # initial distance: the mean head's outer eye corners (9 cm apart) at the observed eye distance
    eye_m = float((p.targets[EYE_OUTER[0]] - p.targets[EYE_OUTER[1]]).norm())
    depth = focal0 * eye_m / p.scale
    centre_px = p.obs[p.frame_w > 0].mean((0, 1))
    tx = (centre_px[0] - width / 2) * depth / focal0
    ty = -(centre_px[1] - height / 2) * depth / focal0
    trans = torch.tensor([[float(tx), float(ty), -depth]], device=dev).repeat(T, 1).requires_grad_(True)
    rvec = torch.zeros(T, 3, device=dev).add_(1e-4).requires_grad_(True)
    losses: list[float] = []

    # stage 1: pose (and focal) against the mean head's template landmarks
    opt = _Adam([(rvec, 0.02), (trans, 0.001)] + ([(log_f, 0.02)] if fit_focal else []))
    tpts = p.targets[None].expand(T, -1, -1)
    for i in range(settings.pose_steps):
        if i % 50 == 0:
            report(0.1 * i / settings.pose_steps, "fitting the head pose")
        opt.zero_grad()
        pix = project(tpts, rotvec_to_matrix(rvec), trans, log_f.exp(), width, height)
        loss = (p.landmark_loss(pix) + settings.temporal * _second_difference(rvec)
                + settings.distance_prior * distance_prior(trans))
        loss.backward()
        opt.step()

    # stage 2: identity, expressions, pose and focal through the network
    u = torch.zeros(1, p.id_mean.shape[0], device=dev, requires_grad=True)
    e = torch.zeros(T, model.cfg.n_expressions, device=dev, requires_grad=True)
    bias = torch.zeros(1, p.L, 3, device=dev, requires_grad=True) if settings.landmark_bias > 0 else None
    opt = _Adam([(u, settings.id_lr), (e, 0.02), (rvec, 0.005), (trans, 0.0005)]
                + ([(log_f, 0.005)] if fit_focal else [])
                + ([(bias, 0.0005)] if bias is not None else []), settings.steps, settings.anneal_to)
    iou = None
    u_sum, n_sum = torch.zeros_like(u), 0
    for i in range(settings.steps):
        report(0.1 + 0.9 * i / settings.steps, f"fitting identity and expressions ({i}/{settings.steps})")
        if i > 0 and i >= settings.id_average_from * settings.steps:
            u_sum, n_sum = u_sum + u.detach(), n_sum + 1
        opt.zero_grad()
        z = p.id_mean[None] + u @ p.id_chol.T
        rot = rotvec_to_matrix(rvec)
        pts = p.landmarks(z, e, bias)
        loss = p.landmark_loss(project(pts, rot, trans, log_f.exp(), width, height))
        loss = (loss + settings.id_prior * u.square().mean()
                + settings.exp_l1 * expression_prior(e, settings.exp_log_eps))
        if bias is not None:
            loss = loss + settings.landmark_bias * (bias / 0.01).square().sum(-1).mean()
        if video:
            loss = loss + settings.temporal * (_second_difference(rvec) + _second_difference(e)
                                               + _second_difference(trans / 0.05))
            loss = loss + settings.distance_prior * distance_prior(trans)
        if use_contour:
            if i % settings.trace_every == 0:  # a longer search the first time: no warm start yet
                p.find_contour(z.detach(), e.detach(), rot.detach(), trans.detach(), log_f.detach().exp(),
                               4 if i == 0 else 1)
            z_c = z if settings.contour_fits_identity else z.detach()
            loss = loss + settings.contour_weight * p.contour_loss(z_c, e, rot, trans, log_f.exp())
        if use_rays:
            if i % settings.trace_every == 0:
                iou = p.trace(z.detach(), e.detach(), rot.detach(), trans.detach(), log_f.detach().exp())
            z_sil = z if settings.image_terms_fit_identity else z.detach()
            loss = loss + settings.silhouette_weight * p.silhouette_loss(z_sil, e, rot, trans, log_f.exp())
        if p.photo:
            loss = loss + settings.photometric * p.photometric_loss(pts, rot, trans, log_f.exp())
        loss.backward()
        opt.step()
        with torch.no_grad():
            e.clamp_(0.0, 1.0)
        losses.append(float(loss.detach()))

    with torch.no_grad():
        z = p.id_mean[None] + (u_sum / n_sum if n_sum else u) @ p.id_chol.T
        rot = rotvec_to_matrix(rvec)
    pts = p.landmarks(z, e.detach(), bias).detach()[:, : p.L]
    with torch.no_grad():
        pix = project(pts, rot, trans, log_f.exp(), width, height)
        err = (pix - p.obs).norm(dim=-1).mean(1)
        lm_err = float(err[p.frame_w > 0].mean())
    return CaptureFit(
        z_id=z[0].cpu().numpy().astype(np.float32), expressions=e.detach().cpu().numpy().astype(np.float32),
        rotation=rot.cpu().numpy().astype(np.float32), translation=trans.detach().cpu().numpy().astype(np.float32),
        focal_px=float(log_f.detach().exp()[0]), observed=observed.astype(np.float32), projected=pix.cpu().numpy(),
        landmark_error_px=lm_err, silhouette_iou=iou, outline_error_px=p.outline_px,
        seconds=time.perf_counter() - t0, losses=losses)
