"""ImHead interface, geometric initialisation and locality by construction (CPU, small sizes)."""

import pytest
import torch

from backend.model import ImHead, ImHeadConfig

PAIRS = [[0, 1], [2, 3], [10, 20]]


def _model(seed: int = 0, randomise_fusion: bool = True) -> ImHead:
    torch.manual_seed(seed)
    m = ImHead(ImHeadConfig(mirror_pairs=PAIRS, local_hidden=32, fusion_hidden=32, dec_hidden=64, sigma=0.005))
    if randomise_fusion:  # the fusion net starts at zero; give it weight so features reach the SDF
        for p in m.fusion.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return m.double()


def test_config_json_roundtrip_and_validation():
    cfg = ImHeadConfig(mirror_pairs=PAIRS, sigma=0.01)
    assert ImHeadConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        ImHeadConfig(mirror_pairs=[[0, 0]])
    with pytest.raises(ValueError):
        ImHeadConfig(mirror_pairs=[[0, 1], [1, 2]])
    with pytest.raises(ValueError):
        ImHeadConfig.from_json('{"bogus": 1}')


def test_shapes():
    m = _model()
    z = torch.randn(2, 256, dtype=torch.float64)
    zr = m.region_codes(z)
    k = m.anchors(zr)
    x = torch.randn(2, 50, 3, dtype=torch.float64) * 0.1
    assert zr.shape == (2, 39, 32) and k.shape == (2, 39, 3)
    assert m.sdf(x, zr, k).shape == (2, 50)
    assert m.blend_weights(x, k).shape == (2, 50, 39)
    assert m.warp(x, torch.rand(2, 53, dtype=torch.float64), z).shape == (2, 50, 3)
    assert m.template(x, zr, k).shape == (2, 50, 3)
    with pytest.raises(ValueError):
        m.sdf(x, zr[:, :38], k)


def test_untrained_network_is_the_prior_sphere():
    m = _model(randomise_fusion=False)
    z = torch.randn(3, 256, dtype=torch.float64)
    zr, k = m.decode(z)
    x = torch.rand(3, 400, 3, dtype=torch.float64) * 0.4 - 0.2
    c = torch.tensor(m.cfg.prior_center, dtype=torch.float64)
    ref = (x - c).norm(dim=-1) - m.cfg.prior_radius
    assert torch.allclose(m.sdf(x, zr, k), ref, atol=1e-12)
    assert 0.05 <= m.cfg.prior_radius <= 0.15  # head-sized


def test_neutral_warp_is_identity():
    m = _model()
    for p in m.warp_net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 30, 3, dtype=torch.float64) * 0.1
    z = torch.randn(2, 256, dtype=torch.float64)
    assert torch.equal(m.warp(x, torch.zeros(2, 53, dtype=torch.float64), z), torch.zeros_like(x))
    assert m.warp(x, torch.rand(2, 53, dtype=torch.float64), z).abs().max() > 0


def test_topk_all_regions_equals_dense_and_topk_error_bounded_by_dropped_mass():
    m = _model()
    z = torch.randn(2, 256, dtype=torch.float64)
    zr, k = m.decode(z)
    x = torch.rand(2, 300, 3, dtype=torch.float64) * 0.3 - 0.15
    dense = m.features(x, zr, k)
    assert torch.allclose(m.features(x, zr, k, topk=39), dense, atol=1e-12)
    # the pair path evaluated for every region equals the dense path
    f8 = m.features(x, zr, k, topk=8)
    _, _, dropped = m.topk_weights(x, k, 8)
    # |f_dense - f_topk| <= 2 * dropped * max_j |g_j|
    g = m._local_dense(x, zr, k)
    bound = 2 * dropped * g.norm(dim=-1).amax(-1)
    assert ((dense - f8).norm(dim=-1) <= bound + 1e-12).all()


def test_mirror_pairs_share_weights_with_flipped_x():
    m = _model()
    z = torch.randn(1, 256, dtype=torch.float64)
    zr, k = m.decode(z)
    zr = zr.clone()
    zr[:, 1] = zr[:, 0]  # same code for both members of pair (0, 1)
    k = m.anchors(zr)
    x = torch.randn(1, 20, 3, dtype=torch.float64) * 0.05
    xm = x * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    kk = k.clone()
    kk[:, 1] = (k[:, 0] - m.anchor_bias[0]) * torch.tensor([-1.0, 1, 1], dtype=torch.float64) + m.anchor_bias[1]
    assert torch.allclose(kk[:, 1], k[:, 1], atol=1e-12)  # anchor offsets mirror
    g = m._local_dense(x, zr, k)
    # region 1's feature at the mirror of (x relative to k_1) equals region 0's at x relative to k_0
    x0 = k[:, 0:1] + x
    x1 = k[:, 1:2] + xm
    g0 = m._local_dense(x0, zr, k)[:, :, 0]
    g1 = m._local_dense(x1, zr, k)[:, :, 1]
    assert torch.allclose(g0, g1, atol=1e-12)
    assert g.shape[2] == 39


def test_locality_by_construction_under_topk():
    """Changing region j's code leaves the SDF bit-for-bit unchanged wherever j is outside the top k,
    and nearly unchanged wherever its dense blend weight is negligible."""
    m = _model()
    z = torch.randn(1, 256, dtype=torch.float64)
    zr, k = m.decode(z)
    j = 7
    zr2 = zr.clone()
    zr2[:, j] = torch.randn(32, dtype=torch.float64) * 3
    k2 = m.anchors(zr2)
    assert torch.equal(torch.cat([k[:, :j], k[:, j + 1 :]], 1), torch.cat([k2[:, :j], k2[:, j + 1 :]], 1))
    x = torch.rand(1, 4000, 3, dtype=torch.float64) * 0.36 - 0.18
    K = 4
    s1, s2 = m.sdf(x, zr, k, topk=K), m.sdf(x, zr2, k2, topk=K)
    idx1, _, _ = m.topk_weights(x, k, K)
    idx2, _, _ = m.topk_weights(x, k2, K)
    outside = ~((idx1 == j).any(-1) | (idx2 == j).any(-1))
    assert outside.sum() > 1000
    assert torch.equal(s1[outside], s2[outside])
    assert (s1[~outside] != s2[~outside]).any()  # the edit does act where region j is present
    # dense evaluation: change bounded where w_j is negligible in both
    w1, w2 = m.blend_weights(x, k)[..., j], m.blend_weights(x, k2)[..., j]
    far = (w1 < 1e-9) & (w2 < 1e-9)
    assert far.sum() > 500
    assert (m.sdf(x, zr, k) - m.sdf(x, zr2, k2))[far].abs().max() < 1e-8
