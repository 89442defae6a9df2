"""Root finding through a backward warp: an analytic warp with a known inverse, and residual checks."""

import pytest
import torch

from backend.engine import deform
from backend.engine.deform import solve

AMPLITUDE = torch.tensor([0.0, 0.01, 0.02, 0.04], dtype=torch.float64)


def smooth_warp(x, frame):
    """Backward warp dx(x) of a smooth, invertible (|d warp/dx| < 1) field, scaled per frame."""
    a = AMPLITUDE[frame][:, None]
    return a * torch.stack([torch.sin(20 * x[:, 1]), 5 * x[:, 2] * torch.cos(15 * x[:, 0]),
                            torch.sin(10 * x[:, 0] + 5 * x[:, 1])], 1)


def test_recovers_known_posed_points():
    g = torch.Generator().manual_seed(0)
    posed = (torch.rand(4000, 3, generator=g, dtype=torch.float64) - 0.5) * 0.3
    # Canonical points of frame 3: x_c = x + warp(x). Frames 0..2 use other amplitudes: check the residual.
    x_c = posed + smooth_warp(posed, torch.full((4000,), 3))
    res = solve(smooth_warp, x_c, 4, tol=1e-9)
    assert res.vertices.shape == (4, 4000, 3)
    assert res.converged.all()
    assert torch.allclose(res.vertices[3], posed, atol=1e-8)
    assert torch.allclose(res.vertices[0], x_c)  # frame 0 has a zero warp: identity
    for t in range(4):
        f = res.vertices[t] + smooth_warp(res.vertices[t], torch.full((4000,), t)) - x_c
        assert f.norm(dim=1).max() <= 1e-9
        assert torch.allclose(f.norm(dim=1), res.root_residual[t])


@pytest.mark.parametrize("jacobian_after", [0, deform.JACOBIAN_AFTER])
def test_affine_warp(monkeypatch, jacobian_after):
    # warp(x) = M x + c: F is affine. With the exact Jacobian from the start (JACOBIAN_AFTER = 0) the first
    # Newton step is exact; Jacobian-free Broyden terminates on an affine F in at most 2n = 6 steps (Gay 1979).
    monkeypatch.setattr(deform, "JACOBIAN_AFTER", jacobian_after)
    m = torch.tensor([[0.1, 0.05, 0.0], [-0.02, -0.3, 0.1], [0.0, 0.2, 0.15]], dtype=torch.float64)
    c = torch.tensor([0.01, -0.02, 0.005], dtype=torch.float64)
    warp = lambda x, frame: x @ m.T + c  # noqa: E731
    x_c = torch.randn(100, 3, dtype=torch.float64) * 0.1
    res = solve(warp, x_c, 1, tol=1e-12)
    expected = torch.linalg.solve(torch.eye(3, dtype=torch.float64) + m, (x_c - c).T).T
    assert res.iterations <= (1 if jacobian_after == 0 else 6)
    assert res.converged.all()
    assert torch.allclose(res.vertices[0], expected, atol=1e-12)
    assert res.stats["jacobian_points"] == (100 if jacobian_after == 0 else 0)


def test_non_convergence_is_reported_with_best_iterate_fallback():
    # A warp that maps all of space to one point has a singular Jacobian: the solver must refuse it.
    warp = lambda x, frame: -x + torch.tensor([0.5, 0.0, 0.0], dtype=x.dtype)  # noqa: E731  maps all x to 0.5
    x_c = torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        solve(warp, x_c, 1)  # singular Jacobian: refused, not silently wrong

    def bent(x, frame):  # x + warp(x) = x + 0.5*sin(40 x) folds: Broyden may stall; must stay finite
        return 0.5 * torch.sin(40 * x)

    x_c = torch.rand(2000, 3, dtype=torch.float64) * 0.2
    res = solve(bent, x_c, 1, tol=1e-10, max_iter=3)
    assert torch.isfinite(res.vertices).all()
    bad = ~res.converged[0]
    assert bad.any()
    first_order = x_c - bent(x_c, None)
    f0 = (first_order + bent(first_order, None) - x_c).norm(dim=1)
    # The fallback is never worse than the first-order estimate.
    assert (res.root_residual[0] <= f0 + 1e-15).all()
    f = (res.vertices[0] + bent(res.vertices[0], None) - x_c).norm(dim=1)
    assert torch.allclose(f, res.root_residual[0])


def test_fixed_topology_order():
    # Vertex i of every frame belongs to canonical vertex i: permuting the input permutes the output.
    x_c = (torch.rand(500, 3, dtype=torch.float64) - 0.5) * 0.3
    perm = torch.randperm(500)
    a = solve(smooth_warp, x_c, 4, tol=1e-10)
    b = solve(smooth_warp, x_c[perm], 4, tol=1e-10)
    assert torch.allclose(a.vertices[:, perm], b.vertices, atol=1e-9)


def test_points_the_path_leaves_unconverged_follow_a_finer_path():
    """solve_continued(refine=2), as the deform op calls it: a point not converged at the end of the path follows
    paths of 2x and 4x the steps and takes a finer path's root where that converges (seeds 3, 11 and 16's mouth
    corners under jawOpen with piece 12's weights: 4 steps leave them unsolved, 8 solve them). Converged points
    keep their roots bitwise, and a frame's result does not depend on the other frames of the request."""
    torch.manual_seed(0)
    w = torch.randn(3, 3) * 0.6
    e = torch.tensor([[1.0], [0.5], [0.0]])

    def make(t):
        return lambda x, frame: (e * t)[frame] * 0.02 * torch.tanh(60 * x @ w)

    x_c = torch.rand(300, 3) * 0.1 - 0.05
    steps = deform.frame_continuation_steps(e)
    kwargs = {"max_iter": 5, "zero_frames": (e == 0).all(1)}
    coarse = deform.solve_continued(make, x_c, 3, steps, **kwargs)
    out = deform.solve_continued(make, x_c, 3, steps, refine=deform.REFINE_PATH, **kwargs)
    assert int((~coarse.converged).sum()) > 50 and int((~out.converged).sum()) < 20
    assert (coarse.converged <= out.converged).all()
    assert torch.equal(out.vertices[coarse.converged], coarse.vertices[coarse.converged])
    assert out.stats is not None and out.stats["refined_points"] > 50
    alone = deform.solve_continued(make, x_c, 1, steps[:1], refine=deform.REFINE_PATH, max_iter=5)
    assert torch.equal(alone.vertices[0], out.vertices[0]) and torch.equal(alone.converged[0], out.converged[0])
    assert torch.equal(out.vertices[2], x_c)
