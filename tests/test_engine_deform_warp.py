"""The folded per-frame warp (deform.model_warp) is the model's own warp, and the solver on the real network."""

import pytest
import torch

from backend.engine import deform
from backend.model.imhead import ImHead, ImHeadConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ImHead(ImHeadConfig()).eval()
    with torch.no_grad():  # the last warp layer is zero-initialised: give it a warp of a few mm
        last = m.warp_net[-1]
        last.weight.normal_(0, 0.05)
        last.bias.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("n_frames, chunk", [(3, 1000), (70, 4096)])  # 70 frames in one chunk: basis fallback
def test_folded_warp_matches_model(model, n_frames, chunk):
    g = torch.Generator().manual_seed(1)
    z_id = torch.randn(1, 256, generator=g)
    e = torch.rand(n_frames, 53, generator=g) * (torch.rand(n_frames, 53, generator=g) < 0.3)
    x = (torch.rand(3000, 3, generator=g) - 0.5) * 0.3
    frame = torch.randint(0, n_frames, (3000,), generator=g).sort().values
    ref = model.warp(x[:, None], e[frame], z_id.expand(3000, -1))[:, 0]
    assert ref.abs().max() > 1e-3
    with torch.no_grad():
        got = deform.model_warp(model, z_id, e, chunk)(x, frame)
        generic = deform._generic_model_warp(model, z_id, e, chunk)(x, frame)
    assert torch.allclose(generic, ref, atol=1e-9)
    assert (got - ref).abs().max() <= 1e-7  # float32 summation order only (warp of ~mm)
    # Gradients (the exact-Jacobian restart) flow through the folded network too.
    jf = deform._jacobian(deform.model_warp(model, z_id, e, chunk), x[:50], frame[:50])
    jr = deform._jacobian(deform._generic_model_warp(model, z_id, e, chunk), x[:50], frame[:50])
    assert torch.allclose(jf, jr, atol=1e-5)


def test_solver_on_network_warp(model):
    g = torch.Generator().manual_seed(2)
    z_id = torch.randn(1, 256, generator=g)
    e = torch.rand(3, 53, generator=g) * (torch.rand(3, 53, generator=g) < 0.2)
    e[1] = 0  # a neutral frame: skipped, x = x_c exactly
    warp = deform.model_warp(model, z_id, e, 1 << 12)
    x_c = (torch.rand(2000, 3, generator=g) - 0.5) * 0.3
    res = deform.solve(warp, x_c, 3, zero_frames=(e == 0).all(1))
    assert res.stats["skipped_frames"] == 1
    assert torch.equal(res.vertices[1], x_c) and (res.root_residual[1] == 0).all()
    frame = torch.arange(3).repeat_interleave(2000)
    with torch.no_grad():
        f = res.vertices.reshape(-1, 3) + warp(res.vertices.reshape(-1, 3), frame) - x_c.repeat(3, 1)
    # The reported root residual is the true |F| at the returned positions, <= tol where converged.
    assert torch.allclose(f.norm(dim=1), res.root_residual.reshape(-1), atol=1e-7)
    assert torch.allclose(f, res.root_vector.reshape(-1, 3), atol=1e-7)
    assert res.converged.float().mean() > 0.99
    assert (res.root_residual[res.converged] <= 1e-6).all()


def test_a_points_warp_does_not_depend_on_its_batch(model):
    """Products of a few rows round differently on the CPU; the folded warp pads them (deform.MIN_ROWS), so each
    point's warp, and with it the root the solver finds, is bitwise the same whichever points share its batch
    (the surface opener's motion is the deform op's). Without the padding 1-11 row batches differed."""
    g = torch.Generator().manual_seed(2)
    z_id = torch.randn(1, 256, generator=g)
    e = torch.rand(2, 53, generator=g)
    x = (torch.rand(600, 3, generator=g) - 0.5) * 0.3
    frame = torch.zeros(600, dtype=torch.long)
    warp = deform.model_warp(model, z_id, e, 4096)
    with torch.no_grad():
        full = warp(x, frame)
        for m in (*range(1, 40), 100, 599):
            assert torch.equal(warp(x[:m], frame[:m]), full[:m]), m
            assert torch.equal(warp(x[m:], frame[m:]), full[m:]), m
    with torch.no_grad():
        alone = torch.cat([deform.solve(warp, x[i : i + 1], 1).vertices[0] for i in range(0, 600, 37)])
        together = deform.solve(warp, x, 1).vertices[0, ::37]
    assert torch.equal(alone, together)
