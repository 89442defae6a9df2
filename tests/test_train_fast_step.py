"""The analytic-gradient training step equals the original double-backward step (loss terms and every
parameter gradient, float64), and the encoder + analytic recipe trains, resumes and exports."""

import json

import pytest
import torch

from backend.model import ImHead, ImHeadConfig
from backend.train import train
from backend.train.export import export, load_training_checkpoint
from backend.train.fast_step import FastTrainModule
from backend.train.losses import LossWeights, TrainModule
from backend.train.synthetic import SphereSource
from backend.weights import load_model

MIRROR = [[0, 1], [5, 9]]


def _posed_batch(src: SphereSource, b: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """A sphere batch whose posed points differ from the canonical ones and carry expression weights, so
    the warp and its Jacobian are exercised."""
    g = torch.Generator().manual_seed(seed)
    batch = src.batch(b, n, n, g)
    batch["exp_weights"] = torch.rand(b, batch["exp_weights"].shape[1], generator=g)
    batch["surf_posed"] = batch["surf_posed"] + 0.003 * torch.randn(batch["surf_posed"].shape, generator=g)
    batch["space_posed"] = batch["space_posed"] + 0.003 * torch.randn(batch["space_posed"].shape, generator=g)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("encoder", [False, True])
def test_analytic_step_equals_autograd_step(encoder):
    torch.manual_seed(0)
    src = SphereSource(3)
    cfg = ImHeadConfig(mirror_pairs=MIRROR, **train.TINY)
    coeff_dim = 100 if encoder else None
    ref = TrainModule(ImHead(cfg, src.anchor_init), src.n, id_coeff_dim=coeff_dim).double()
    with torch.no_grad():  # leave the zero-initialised last layers: every path must carry gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = FastTrainModule(ImHead(cfg, src.anchor_init), src.n, id_coeff_dim=coeff_dim).double()
    fast.load_state_dict(ref.state_dict())
    batch = _posed_batch(src, 2, 48, seed=3)
    w = LossWeights()
    loss_ref, terms_ref = ref(batch, w, None)
    loss_ref.backward()
    loss_fast, terms_fast = fast(batch, w, None)
    loss_fast.backward()
    assert terms_ref["deform"] > 0 and terms_ref["normal"] > 0
    for name in terms_ref:
        assert torch.allclose(terms_ref[name], terms_fast[name], rtol=1e-6, atol=0), name
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert a.grad is not None and b.grad is not None, name
        err = float((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-300))
        assert err < 1e-9, (name, err)


def test_deform_motion_weights_the_warp_error_by_ict_motion():
    """deform_motion: the mean of each surface point's warp error times its ICT motion in cm, added to the total
    with its weight (zero by default: the total is the plain recipe's)."""
    torch.manual_seed(0)
    src = SphereSource(2)
    module = FastTrainModule(ImHead(ImHeadConfig(mirror_pairs=MIRROR, **train.TINY), src.anchor_init), src.n).double()
    batch = _posed_batch(src, 2, 32, seed=5)
    step = torch.nn.functional.normalize(torch.randn(batch["surf_canon"].shape, dtype=torch.float64), dim=-1)
    batch["surf_posed"] = batch["surf_canon"] + 0.004 * step          # every point moves 0.4 cm
    loss, terms = module(batch, LossWeights(), None)
    loss_m, terms_m = module(batch, LossWeights(deform_motion=7.0), None)
    assert terms["deform"] > 0
    assert torch.allclose(terms["deform_motion"], 0.4 * terms["deform"], rtol=1e-9)
    assert torch.allclose(terms_m["deform_motion"], terms["deform_motion"])
    assert torch.allclose(loss_m, loss + 7.0 * terms["deform_motion"], rtol=1e-12)


def test_analytic_step_refuses_topk():
    src = SphereSource(2)
    fast = FastTrainModule(ImHead(ImHeadConfig(**train.TINY), src.anchor_init), src.n)
    with pytest.raises(ValueError, match="all regions"):
        fast(src.batch(1, 8, 8, torch.Generator().manual_seed(0)), LossWeights(), 4)


def test_encoder_recipe_trains_resumes_and_exports(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ck = tmp_path / "ck"
        args = ["--data", "synthetic", "--tiny", "--batch", "2", "--ns", "96", "--nq", "96", "--total-steps", "60",
                "--log-every", "20", "--warmup", "5", "--lr", "2e-3", "--code-lr", "1e-2", "--n-synthetic", "2",
                "--minutes", "10", "--ckpt", str(ck)]
        train.main(args + ["--max-steps", "20"])
        train.main(args)
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (tmp_path / "ck.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [20, 40, 60]
    assert log[-1]["surface"] < 0.5 * log[0]["surface"], log
    module, info = load_training_checkpoint(ck)
    assert module.encodes_identities and info["step"] == 60 and info["pieces"] == 2
    out = tmp_path / "w" / "imhead.safetensors"
    export(ck, out)
    loaded = load_model(out.parent)
    with torch.no_grad():
        codes = module.id_encoder(torch.randn(4096, 100, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(loaded.extras["id_mean"], codes.mean(0), atol=3 * float(codes.std(0).max()) / 64)
    assert loaded.meta["n_train_identities"] == "all (encoder)"
