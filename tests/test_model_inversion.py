"""Latent fitting's optimiser: the built-in cosine schedule is torch's, and a fit does not load torch._dynamo
(a torch.optim.Optimizer does, which cost 4-6 s of a process's first fit on the GPU machine); the fitted pose's
parametrisation."""

import math

import pytest
import torch

from backend.model.inversion import POSE_RADIUS, CodeAdam, apply_pose, pose_matrix


def test_code_adam_cosine_schedule_is_torchs():
    steps, lr = 37, 0.03
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, steps, eta_min=lr * 0.05)
    p = torch.zeros(2, 4, requires_grad=True)
    opt = CodeAdam([p], lr=lr, cosine_steps=steps, lr_min=lr * 0.05)
    for _ in range(steps):
        assert opt.lr == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        p.grad = torch.ones_like(p)
        opt.step()
        ref_opt.step()
        ref.step()


def test_fit_does_not_import_dynamo(run_python):
    code = (
        "import sys, torch\n"
        "from backend.model.imhead import ImHead, ImHeadConfig\n"
        "from backend.model.inversion import fit_latents\n"
        "m = ImHead(ImHeadConfig())\n"
        "fit_latents(m, torch.randn(64, 3) * 0.05, fit_expression=True, steps=2, batch_points=32, topk=4,\n"
        "            fit_pose=True)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    assert run_python(code).strip() == "False"


def test_pose_turns_about_the_centre():
    centre = torch.tensor([[0.01, 0.02, -0.03]], dtype=torch.float64)
    angle, shift = 0.1, torch.tensor([0.002, -0.001, 0.004], dtype=torch.float64)
    motion = torch.cat([torch.tensor([0.0, 0.0, angle * POSE_RADIUS], dtype=torch.float64), shift])[None]
    m = pose_matrix(motion, centre)
    assert torch.allclose(apply_pose(m, centre[:, None])[0, 0], centre[0] + shift)
    x = centre + torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)  # a unit off the centre along x
    want = centre + shift + torch.tensor([[math.cos(angle), math.sin(angle), 0.0]], dtype=torch.float64)
    assert torch.allclose(apply_pose(m, x[:, None])[0], want)
