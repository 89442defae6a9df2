"""The fit's outline term (backend/capture/contour.py, fit._Problem.find_contour / contour_loss) on a sphere with a
known answer: the mask's signed distance, contour points on the true occluding contour, an outline error of
(nearly) zero when the sphere's outline is the mask's, and gradients to the pose and to the shape (through the
implicitly differentiated contour points) against finite differences that re-find the points from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from backend.capture import camera, contour, correspondence
from backend.capture.fit import REFERENCE_EYE_PX, FitSettings, _Problem

W = H = 96
FOCAL = torch.tensor([200.0])
RADIUS = 0.08  # m
DISTANCE = 0.6


class _Sphere(torch.nn.Module):
    """Stands in for the model: a sphere at the origin whose radius is RADIUS * (1 + z[0]); no warp."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the device

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, None, :1], z[:, None, :1]

    def sdf(self, x: Tensor, zr: Tensor, k: Tensor, topk: int | None = None) -> Tensor:
        return x.norm(dim=-1) - RADIUS * (1 + zr[..., 0])

    def warp(self, x: Tensor, e: Tensor, z: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _pose(T: int, dx: float = 0.0) -> tuple[Tensor, Tensor]:
    rot = camera.rotvec_to_matrix(torch.tensor([[0.0, 0.3, 0.0]] * T))
    trans = torch.tensor([[dx, 0.0, -DISTANCE]] * T)
    return rot, trans


def _disc_masks(T: int, radius: float, k: int = 1) -> np.ndarray:
    """The sphere's exact silhouette at _pose(): pixel centres whose ray passes within `radius` of the centre;
    k: the footage k times larger (size and focal length)."""
    rot, trans = _pose(T)
    y, x = np.mgrid[0 : k * H, 0 : k * W].astype(np.float32) + 0.5
    px = torch.as_tensor(np.stack([x, y], -1).reshape(1, -1, 2)).expand(T, -1, -1)
    origin, d = camera.pixel_rays(px, rot, trans, k * FOCAL, k * W, k * H)
    miss = (origin - ((origin * d).sum(-1, keepdim=True)) * d).norm(dim=-1)
    return (miss < radius).reshape(T, k * H, k * W).numpy()


def _problem(masks: np.ndarray, eye_px: float = 30.0) -> _Problem:
    T, h, w = masks.shape
    targets = np.zeros((len(correspondence.USED), 3), np.float32)
    observed = np.full((T, len(targets), 2), w / 2, np.float32)
    observed[:, correspondence.USED.index(36), 0] -= eye_px  # eye distance for the landmark scale
    extras = {"id_mean": torch.zeros(2), "id_chol": torch.eye(2)}
    return _Problem(_Sphere(), extras, targets, observed, np.ones(T, bool), masks, w, h, True,
                    FitSettings(silhouette_term="contour", contour_points=48))


def _outline(p: _Problem, z: Tensor, trans: Tensor, k: int = 1) -> Tensor:
    rot, _ = _pose(p.T)
    e = torch.zeros(p.T, 53)
    p.find_contour(z.detach(), e, rot, trans.detach(), k * FOCAL, 4)
    return p.contour_loss(z, e, rot, trans, k * FOCAL)


def test_signed_distance_and_sampling():
    mask = np.zeros((1, 8, 12), bool)
    mask[0, :, :5] = True  # the outline is the line x = 5 (pixel edges at integers)
    d = torch.as_tensor(contour.signed_distance(mask).astype(np.float32))
    px = torch.tensor([[[5.0, 4.0], [7.5, 3.5], [3.5, 2.0], [5.25, 6.0]]])
    assert contour.sample(d, px)[0].tolist() == pytest.approx([0.0, 2.5, -1.5, 0.25], abs=1e-3)
    zero = torch.zeros(1, 3, requires_grad=True)
    loss = contour.loss(zero, torch.ones(1, 3), 30.0)
    (g,) = torch.autograd.grad(loss, zero)
    assert float(loss.detach()) == 0.0 and float(g.abs().max()) == 0.0


def test_contour_points_lie_on_the_occluding_contour():
    p = _problem(_disc_masks(2, RADIUS))
    _outline(p, torch.zeros(1, 2), _pose(2)[1])
    assert p.outline is not None
    x, _, used = p.outline
    rot, trans = _pose(2)
    eye = -(rot.transpose(-1, -2) @ trans[..., None])[..., 0]  # the camera centre in the model frame
    x = x[used > 0]
    assert len(x) > 80
    n = x / x.norm(dim=-1, keepdim=True)
    view = x - eye.repeat_interleave((used > 0).sum(1), 0)
    view = view / view.norm(dim=-1, keepdim=True)
    assert float((x.norm(dim=-1) - RADIUS).abs().max()) < 1e-5  # on the surface
    assert float((n * view).sum(-1).abs().max()) < 2e-3  # edge-on: the normal is perpendicular to the view ray


def test_zero_on_the_mask_outline_and_the_sign_of_a_larger_head():
    p = _problem(_disc_masks(2, RADIUS))
    zero = torch.zeros(1, 2, requires_grad=True)
    loss = _outline(p, zero, _pose(2)[1])
    assert p.outline_px is not None and p.outline_px < 0.25  # the pixel grid's staircase, no more
    # a sphere 5% larger: its outline lies about 5% of the silhouette's radius (~27 px) outside the mask
    big = torch.tensor([[0.05, 0.0]], requires_grad=True)
    loss_big = _outline(p, big, _pose(2)[1])
    assert p.outline_px == pytest.approx(0.05 * 27, rel=0.15)
    (g,) = torch.autograd.grad(loss_big, big)
    assert float(g[0, 0]) > 0 and float(loss_big.detach()) > 20 * float(loss.detach())  # it shrinks it back


def test_gradients_match_finite_differences():
    """Pose and shape gradients against finite differences that build the problem and find the contour points
    anew at each side: the attached gradient ignores the points' sliding along the contour, which is right to
    first order."""
    masks = _disc_masks(2, RADIUS)

    def value(z: Tensor, trans: Tensor) -> Tensor:
        return _outline(_problem(masks), z, trans)

    z = torch.tensor([[0.02, 0.0]], requires_grad=True)  # a sphere 2% larger (half a pixel)
    trans = _pose(2, dx=0.004)[1].requires_grad_(True)  # frames moved ~1.3 px sideways
    g_z, g_t = torch.autograd.grad(value(z, trans), [z, trans])
    h = 1e-3
    with torch.no_grad():
        fd_z = (value(z + torch.tensor([[h, 0.0]]), trans) - value(z - torch.tensor([[h, 0.0]]), trans)) / (2 * h)
        step = torch.zeros_like(trans)
        step[1, 0] = 1e-4
        fd_t = (value(z, trans + step) - value(z, trans - step)) / 2e-4
    assert float(g_z[0, 0]) == pytest.approx(float(fd_z), rel=0.03)
    assert float(g_t[1, 0]) == pytest.approx(float(fd_t), rel=0.03)
    assert float(g_t[1, 0]) > 0  # moved right of the mask: pulled back left


def test_the_outline_term_weighs_the_same_at_any_resolution():
    """The same scene as footage three times larger: the outline error in pixels triples, the loss (in eye
    distances, its bend in reference pixels: fit.REFERENCE_EYE_PX) stays."""
    big = torch.tensor([[0.05, 0.0]])
    out = []
    for k in (1, 3):
        p = _problem(_disc_masks(2, RADIUS, k), eye_px=60.0 * k)
        assert p.px == pytest.approx(60.0 * k / REFERENCE_EYE_PX)
        out.append((float(_outline(p, big, _pose(2)[1], k)), p.outline_px))
    (loss_1, px_1), (loss_3, px_3) = out
    assert px_1 == pytest.approx(0.05 * 27, rel=0.15) and px_3 == pytest.approx(3 * 0.05 * 27, rel=0.15)
    # the pixel grid's staircase moves the smaller footage's outline by ~0.1 px; a bend fixed at one footage
    # pixel would halve the larger footage's loss
    assert loss_3 == pytest.approx(loss_1, rel=0.15)
