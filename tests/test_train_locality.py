"""The region-swap locality term (backend/train/locality.py) on a tiny model and the sphere source (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.model import ImHead, ImHeadConfig
from backend.train import train
from backend.train.fast_step import FastTrainModule
from backend.train.locality import MARGIN, SwapLocality, swap_sdf_change
from backend.train.losses import LossWeights, TrainModule
from backend.train.synthetic import SphereSource

MIRROR = [[0, 1], [5, 9]]


def _sphere_template(src: SphereSource, rings: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sphere source's template (its mean sphere) as a UV-sphere mesh, each vertex in the region of its
    nearest anchor direction, as the source labels surf_region."""
    theta = np.linspace(0, math.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * math.pi, 2 * rings, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    d = np.concatenate([[[0, 1, 0]], d, [[0, -1, 0]]])
    n, m = len(theta), len(phi)
    idx = lambda i, j: 1 + i * m + j % m  # noqa: E731
    faces = [[0, idx(0, j + 1), idx(0, j)] for j in range(m)]
    for i in range(n - 1):
        for j in range(m):
            faces += [[idx(i, j), idx(i, j + 1), idx(i + 1, j)], [idx(i, j + 1), idx(i + 1, j + 1), idx(i + 1, j)]]
    faces += [[len(d) - 1, idx(n - 1, j), idx(n - 1, j + 1)] for j in range(m)]
    verts = src.mean_centre.double().numpy() + src.mean_radius * d
    region = (d @ src.dirs.double().numpy().T).argmax(1)
    return verts, np.asarray(faces), region


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    src = SphereSource(4)
    verts, faces, region = _sphere_template(src)
    loc = SwapLocality(verts, faces, region, 39, cell=0.006, samples=100_000)
    return src, loc


def _model(src: SphereSource) -> ImHead:
    """A tiny model whose every path carries signal (the fusion head's last layer starts at zero)."""
    model = ImHead(ImHeadConfig(mirror_pairs=MIRROR, **train.TINY), src.anchor_init)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _brute_change(model: ImHead, zr: torch.Tensor, x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The swap through the full model: head b with head b-1's code for region[b], minus head b."""
    swapped = zr.clone()
    b = torch.arange(zr.shape[0])
    swapped[b, region] = zr[(b - 1) % zr.shape[0], region]
    return model.sdf(x, swapped, model.anchors(swapped)) - model.sdf(x, zr, model.anchors(zr))


def test_swap_change_is_the_full_models_change(setup):
    src, _ = setup
    model = _model(src).double()
    zr = torch.randn(3, 39, model.cfg.region_dim, dtype=torch.float64)
    k = model.anchors(zr)
    x = src.batch(3, 64, 64, torch.Generator().manual_seed(1))["surf_canon"].double()
    region = torch.tensor([3, 17, 30])
    with torch.no_grad():
        got = swap_sdf_change(model, zr, k, model.features(x, zr, k), x, region)
        ref = _brute_change(model, zr, x, region)
    assert ref.abs().max() > 1e-6
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_term_is_zero_where_nothing_can_change(setup):
    src, loc = setup
    model = _model(src)
    batch = src.batch(3, 64, 64, torch.Generator().manual_seed(2))
    x, tmpl = batch["surf_canon"], batch["surf_template"]
    zr = torch.randn(1, 39, model.cfg.region_dim).expand(3, -1, -1)  # every head has the same codes
    k = model.anchors(zr)
    region = torch.tensor([0, 8, 21])
    with torch.no_grad():
        feat = model.features(x, zr, k)
        assert loc(model, zr, k, feat, x, tmpl, region) == 0
        zr2 = torch.randn(3, 39, model.cfg.region_dim)  # different codes, but every point within the margin
        k2 = model.anchors(zr2)
        near = src.mean_centre + src.mean_radius * src.dirs[region][:, None].expand(-1, 8, -1)
        assert (loc.region_distance(near, region) < MARGIN).all()
        assert loc(model, zr2, k2, model.features(near, zr2, k2), near, near, region) == 0
        assert loc(model, zr2, k2, model.features(x, zr2, k2), x, tmpl, region) > 0


def test_margin_is_the_distance_to_the_regions_surface(setup):
    src, loc = setup
    d = torch.nn.functional.normalize(torch.randn(1, 2000, 3, generator=torch.Generator().manual_seed(3)), dim=-1)
    p = src.mean_centre + src.mean_radius * d
    region = torch.tensor([7])
    own = (d[0] @ src.dirs.T).argmax(-1) == 7
    got = loc.region_distance(p, region)[0]
    assert (got[own] < 0.004).all()  # a region's own points: about 0 (cell-sized interpolation)
    assert (got[~own] > 0).all()
    far = (d[0] @ src.dirs[7]) < 0.5  # 60 degrees away on a ~8 cm sphere: well outside the margin
    assert (got[far] >= 3 * MARGIN - 1e-6).all()


@pytest.mark.parametrize("encoder", [False, True])
def test_analytic_and_autograd_steps_give_the_same_locality_term(setup, encoder):
    src, loc = setup
    torch.manual_seed(0)
    cfg = ImHeadConfig(mirror_pairs=MIRROR, **train.TINY)
    coeff_dim = 100 if encoder else None
    ref = TrainModule(ImHead(cfg, src.anchor_init), src.n, id_coeff_dim=coeff_dim).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = FastTrainModule(ImHead(cfg, src.anchor_init), src.n, id_coeff_dim=coeff_dim).double()
    fast.load_state_dict(ref.state_dict())
    ref.locality = fast.locality = loc
    batch = src.batch(3, 48, 48, torch.Generator().manual_seed(4))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    batch["swap_region"] = torch.tensor([2, 19, 33])
    w = LossWeights(locality=3000.0)
    loss_ref, terms_ref = ref(batch, w, None)
    loss_ref.backward()
    loss_fast, terms_fast = fast(batch, w, None)
    loss_fast.backward()
    loss_off, terms_off = fast(batch, LossWeights(), None)
    assert "locality" not in terms_off  # off by default: not computed
    assert terms_ref["locality"] > 0
    assert torch.allclose(terms_ref["locality"], terms_fast["locality"], rtol=1e-9, atol=0)
    assert torch.allclose(loss_fast, loss_off + 3000.0 * terms_fast["locality"], rtol=1e-12)
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert a.grad is not None and b.grad is not None, name
        err = float((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-300))
        assert err < 1e-9, (name, err)


def test_locality_gradient_reduces_the_measured_swap_effect(setup):
    """A few Adam steps on the term alone shrink the swap's SDF change outside the margin (measured through
    the full model, on other points and other region draws than the steps saw)."""
    src, loc = setup
    torch.manual_seed(0)
    module = FastTrainModule(_model(src), src.n)
    with torch.no_grad():
        module.codes.weight.normal_(0.0, 3.0)
        module.model.fusion[-1].weight.mul_(20.0)  # a residual of centimetres, as a trained head's
    module.locality = loc
    zero = {name: 0.0 for name in LossWeights().to_dict() if name != "space_clamp"}
    w = LossWeights(**(zero | {"locality": 3000.0}))
    opt = torch.optim.Adam(module.model.parameters(), lr=3e-3)

    def measured() -> float:
        gen = torch.Generator().manual_seed(99)
        batch = src.batch(4, 256, 16, gen)
        region = torch.randint(39, (4,), generator=gen)
        with torch.no_grad():
            zr = module.model.region_codes(module.codes(batch["id_index"]))
            change = _brute_change(module.model, zr, batch["surf_canon"], region).abs()
        outside = loc.region_distance(batch["surf_template"], region) >= MARGIN
        return float(change[outside].mean())

    before = measured()
    for step in range(40):
        gen = torch.Generator().manual_seed(step)
        batch = src.batch(4, 64, 16, gen)
        batch["id_index"] = torch.arange(4)  # four different heads: every swap changes a code
        batch["swap_region"] = torch.randint(39, (4,), generator=gen)
        loss, _ = module(batch, w, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 1e-7
    assert measured() < 0.5 * before
