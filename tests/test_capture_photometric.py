"""The photo/video fit's photometric term (backend/capture/photometric.py, fit._Problem.photometric_loss): image
sampling, the consistency loss's gradient against finite differences and its sign, and the term's gradient
reaching the identity through the implicitly differentiated skin points."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch

from backend.capture import camera, correspondence, photometric


def _pattern(h: int, w: int, shift: float = 0.0) -> np.ndarray:
    """A smooth colour pattern (uint8, H x W x 3), moved `shift` pixels to the right."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    x = x - shift
    r = 0.5 + 0.4 * np.sin(x / 9.0) * np.cos(y / 13.0)
    g = 0.5 + 0.4 * np.cos(x / 7.0 + y / 11.0)
    b = 0.5 + 0.3 * np.sin((x + y) / 17.0)
    return (255 * np.stack([r, g, b], -1)).round().astype(np.uint8)


def test_sample_reads_pixel_centres():
    img = np.zeros((1, 8, 10, 3), np.uint8)
    img[0, 3, 6] = (255, 128, 0)
    t = photometric.prepare(img, torch.device("cpu"), sigma=1e-3)  # no blur to speak of
    c = photometric.sample(t, torch.tensor([[[6.5, 3.5], [6.0, 3.5]]]))
    assert c[0, 0].tolist() == pytest.approx([1.0, 128 / 255, 0.0], abs=1e-4)
    assert c[0, 1, 0].item() == pytest.approx(0.5, abs=1e-4)  # halfway to the next pixel


def test_consistency_gradient_matches_finite_differences_and_pulls_together():
    frames = np.stack([_pattern(64, 64), _pattern(64, 64, shift=2.0)])
    images = photometric.prepare(frames, torch.device("cpu"))
    base = torch.tensor([[[20.3, 30.2], [40.7, 22.9], [31.1, 45.4]]], dtype=torch.float64).repeat(2, 1, 1)
    w = torch.ones(2, 3, dtype=torch.float64)

    def loss(dx: torch.Tensor) -> torch.Tensor:
        px = base.clone()
        px[1, :, 0] = px[1, :, 0] + dx
        return photometric.consistency_loss(photometric.sample(images, px), w)

    dx = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(dx), dx)
    h = 1e-4
    fd = (loss(torch.tensor(h, dtype=torch.float64)) - loss(torch.tensor(-h, dtype=torch.float64))) / (2 * h)
    assert float(g) == pytest.approx(float(fd), rel=1e-3)
    # frame 1's content sits 2 px to the right: the gradient moves its points right, and that agrees better
    assert float(g) < 0
    assert float(loss(torch.tensor(2.0, dtype=torch.float64))) < 0.2 * float(loss(torch.tensor(0.0)))


def test_patch_correlation_ignores_shading_and_finds_the_shift():
    """The patch term (photometric.patch_ncc_loss): a gain and an offset of one frame's colours (its shading
    after the turn) cost nothing, a patch of the other frame 2 px off costs, and the gradient moves it back."""
    frames = np.stack([_pattern(64, 64), _pattern(64, 64, shift=2.0)])
    images = photometric.prepare(frames, torch.device("cpu"))
    normals = torch.tensor([[[0.0, 0.0, 1.0]] * 3], dtype=torch.float64)
    offsets = photometric.patch_offsets(normals, 5, 1.0)[0, :, :, :2]  # (P, S, 2): a 5 x 5 pixel grid
    assert offsets.shape == (3, 25, 2) and float(offsets.abs().max()) == 2.0
    centre = torch.tensor([[20.3, 30.2], [40.7, 22.9], [31.1, 45.4]], dtype=torch.float64)
    w = torch.ones(2, 3, dtype=torch.float64)

    def colours(dx: torch.Tensor) -> torch.Tensor:
        px = (centre[:, None] + offsets).repeat(2, 1, 1, 1)  # (T, P, S, 2)
        px[1, ..., 0] = px[1, ..., 0] + dx
        return photometric.sample(images, px.reshape(2, -1, 2)).reshape(2, 3, 25, 3)

    aligned = colours(torch.tensor(2.0, dtype=torch.float64))
    shaded = aligned.clone()
    shaded[1] = 0.6 * shaded[1] + 0.1
    assert float(photometric.patch_ncc_loss(shaded, w, 1)) < 0.02
    dx = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    off = photometric.patch_ncc_loss(colours(dx), w, 1)
    (g,) = torch.autograd.grad(off, dx)
    assert float(off.detach()) > 5 * float(photometric.patch_ncc_loss(aligned, w, 1))
    assert float(g) < 0  # frame 1's content sits to the right: its patches move right
    one = torch.ones(1, 3, dtype=torch.float64)
    assert float(photometric.patch_ncc_loss(aligned[:1], one, 3)) == 0.0  # one frame: no pair


def test_visibility_and_skin_points():
    from backend.data.atlas import load_atlas

    atlas = load_atlas()
    ids = photometric.skin_vertices(atlas.vertices, atlas.region, atlas.names, 32)
    assert len(set(ids.tolist())) == 32
    hidden = {atlas.names.index(n) for n in photometric.HIDDEN_REGIONS}
    assert not hidden & set(atlas.region[ids].tolist())
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    pts = torch.zeros(1, 2, 3)
    w = photometric.visibility(normals, pts, torch.eye(3)[None], torch.tensor([[0.0, 0.0, -0.7]]))
    assert w[0].tolist() == [1.0, 0.0]  # facing the camera, facing away
    with pytest.raises(ValueError):
        photometric.prepare(np.zeros((2, 8, 8), np.uint8), torch.device("cpu"))


def _problem(s, frames: np.ndarray, points: int = 12, identity: bool = True,
             term: Literal["colour", "patch"] = "colour"):
    from backend.capture.fit import FitSettings, _Problem

    targets = s.atlas.vertices[correspondence.template_vertices()]
    skin = s.atlas.vertices[photometric.skin_vertices(s.atlas.vertices, s.atlas.region, s.atlas.names, points)]
    T, H, W, _ = frames.shape
    observed = np.full((T, len(targets), 2), W / 2, np.float32)
    observed[:, correspondence.USED.index(36), 0] -= 40  # eye distance for the landmark scale
    return _Problem(s.model, s.extras, targets, observed, np.ones(T, bool), None, W, H, True,
                    FitSettings(photometric=1.0, image_terms_fit_identity=identity, photo_term=term), images=frames,
                    skin=skin)


@pytest.mark.parametrize("term", ["colour", "patch"])
def test_photometric_term_through_the_fit_problem(monkeypatch, term):
    """On the model itself: the term's gradient to a frame's pose matches finite differences and has the sign
    that undoes a known image shift, and it reaches the identity through the attached skin points (checked
    against finite differences that re-solve the points from scratch)."""
    from backend.engine.session import Session

    # the visibility weights carry no gradient by design; held at their first value, the finite differences
    # measure exactly what the attached gradient claims
    first: list[torch.Tensor] = []
    visibility = photometric.visibility

    def frozen(*args: torch.Tensor) -> torch.Tensor:
        if not first:
            first.append(visibility(*args))
        return first[0]

    monkeypatch.setattr(photometric, "visibility", frozen)

    s = Session(device="cpu")
    W = H = 160
    frames = np.stack([_pattern(H, W), _pattern(H, W, shift=2.0)])
    rot = camera.rotvec_to_matrix(torch.tensor([[0.0, math.radians(10), 0.0]] * 2))
    focal = torch.tensor([1.2 * W])
    z0 = s.extras["id_mean"][None].float()
    e = torch.zeros(2, 53)

    def value(trans: torch.Tensor, u: torch.Tensor, identity: bool = True) -> torch.Tensor:
        p = _problem(s, frames, identity=identity, term=term)
        z = z0 + u @ p.id_chol.T
        pts = p.landmarks(z, e)
        return p.photometric_loss(pts, rot, trans, focal)

    trans = torch.tensor([[0.0, 0.01, -0.7]] * 2, requires_grad=True)
    u = torch.zeros(1, 256, requires_grad=True)
    loss = value(trans, u)
    assert float(loss.detach()) > 0 and 0 < float(first[0].sum()) < first[0].numel()
    g_t, g_u = torch.autograd.grad(loss, [trans, u])
    assert float(g_t[1, 0]) < 0  # frame 1 must move right (+x in the camera) to read the same colours
    h = 2e-5
    step = torch.zeros_like(trans)
    step[1, 0] = h
    with torch.no_grad():
        fd = (value(trans + step, u) - value(trans - step, u)) / (2 * h)
    assert float(g_t[1, 0]) == pytest.approx(float(fd), rel=0.05)
    # identity: along the gradient's own direction, re-solving the surface points from scratch
    d = g_u / g_u.norm()
    hu = 0.02
    with torch.no_grad():
        fd_u = (value(trans, u + hu * d) - value(trans, u - hu * d)) / (2 * hu)
    assert float(g_u.norm()) > 0
    assert float((g_u * d).sum()) == pytest.approx(float(fd_u), rel=0.05)
    # with image_terms_fit_identity False the term moves the pose, not the identity
    g_t0, g_u0 = torch.autograd.grad(value(trans, u, identity=False), [trans, u], allow_unused=True)
    assert g_u0 is None or float(g_u0.abs().max()) == 0.0
    assert torch.allclose(g_t0, g_t)


def test_fit_adds_the_term_on_videos_only():
    """fit_capture's loss carries the photometric term where its weight is on and there are frames to pair."""
    from backend.capture.fit import FitSettings, fit_capture
    from backend.engine.session import Session

    s = Session(device="cpu")
    W = H = 160
    frames = np.stack([_pattern(H, W), _pattern(H, W, shift=2.0)])
    p = _problem(s, frames)
    skin = s.atlas.vertices[photometric.skin_vertices(s.atlas.vertices, s.atlas.region, s.atlas.names, 12)]
    targets = p.targets[: p.L].numpy()
    first = {}
    for weight in (0.0, 1.0):
        cfg = FitSettings(steps=1, pose_steps=1, silhouette=False, photometric=weight, photo_points=12)
        fit = fit_capture(s.model, s.extras, targets, p.obs.numpy(), np.ones(2, bool), None, W, H, True, cfg,
                          lambda f, m: None, images=frames, skin=skin)
        first[weight] = fit.losses[0]
    assert first[1.0] > first[0.0]
    with pytest.raises(ValueError, match="do not match"):
        fit_capture(s.model, s.extras, targets, p.obs.numpy(), np.ones(2, bool), None, W, H, True,
                    FitSettings(photometric=1.0), lambda f, m: None, images=frames[:, :80], skin=skin)
