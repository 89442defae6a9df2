"""Training on CPU with a tiny config: the real loop (checkpoint, resume) overfits analytic spheres, and
latent fitting recovers a sphere of the trained family."""

import json
from pathlib import Path

import pytest
import torch

from backend.model import ImHead, ImHeadConfig
from backend.model.inversion import fit_latents
from backend.train import train
from backend.train.checkpoint import load_checkpoint, read_info
from backend.train.export import code_statistics
from backend.train.losses import TrainModule
from backend.train.synthetic import SphereSource

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ARGS = ["--data", "synthetic", "--tiny", "--batch", "2", "--ns", "128", "--nq", "128", "--total-steps", "160",
        "--log-every", "40", "--warmup", "10", "--lr", "2e-3", "--code-lr", "1e-2", "--n-synthetic", "2",
        "--topk", "4", "--minutes", "10", "--step", "autograd", "--identities", "table"]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two on a shared, loaded CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(module, checkpoint info, log records, source) after a run cut into two pieces."""
    tmp = tmp_path_factory.mktemp("train")
    ck = tmp / "ck"
    src = SphereSource(2)
    fresh = TrainModule(ImHead(ImHeadConfig(**train.TINY), anchor_init=src.anchor_init), src.n)
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "80"])  # first piece, cut short
    train.main(ARGS + ["--ckpt", str(ck)])  # resumes and finishes the schedule
    module = TrainModule(ImHead(ImHeadConfig(**train.TINY), anchor_init=src.anchor_init), src.n)
    info = load_checkpoint(ck, module, None)
    log = [json.loads(line) for line in (tmp / "ck.log.jsonl").read_text().splitlines()]
    return fresh, module, info, log, src


def _errors_mm(module: TrainModule, src: SphereSource) -> tuple[float, float]:
    b = src.batch(src.n, 2000, 2000, torch.Generator().manual_seed(123))
    with torch.no_grad():
        zr, k = module.model.decode(module.codes(b["id_index"]))
        surf = module.model.sdf(b["surf_canon"], zr, k, topk=4).abs().mean()
        near = b["canon_sdf"].abs() < 0.01
        space = (module.model.sdf(b["canon_space"], zr, k, topk=4) - b["canon_sdf"]).abs()[near].mean()
    return float(surf) * 1e3, float(space) * 1e3


def test_tiny_model_overfits_spheres_with_resume(trained):
    fresh, module, info, log, src = trained
    surf0, _ = _errors_mm(fresh, src)
    assert surf0 > 10.0  # the prior sphere is far from both targets
    assert info["step"] == 160 and info["pieces"] == 2
    assert [r["step"] for r in log] == [40, 80, 120, 160]
    surf, space = _errors_mm(module, src)
    assert surf < 2.0, surf
    assert space < 2.5, space


def test_fit_latents_recovers_a_sphere_of_the_trained_family(trained):
    _, module, _, _, src = trained
    stats = code_statistics(module.model, module.codes.weight.detach())
    n = torch.nn.functional.normalize(torch.randn(1, 1000, 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    pts = src.centre[1] + src.radius[1] * n  # exactly on sphere 1
    zr0, k0 = module.model.decode(stats["id_mean"][None])
    with torch.no_grad():
        before = float(module.model.sdf(pts, zr0, k0, topk=4).abs().mean())
    res = fit_latents(module.model, pts[0], n[0], fit_expression=False, steps=120, lr=0.05, topk=4,
                      id_mean=stats["id_mean"], id_chol=stats["id_chol"], batch_points=512)
    after = float(res.final_abs_sdf[0])
    assert after < 0.5 * before and after < 2e-3, (after, before)
    assert res.z_exp.abs().max() == 0 and res.zr.shape == (1, 39, 32)


def test_local_width_option_reaches_the_checkpoint(tmp_path, one_thread):
    """--local-hidden sizes the local networks (capacity study): the saved config and tensors follow it."""
    ck = tmp_path / "wide"
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "1", "--local-hidden", "40"])
    src = SphereSource(2)
    cfg = ImHeadConfig(**(train.TINY | {"local_hidden": 40}))
    module = TrainModule(ImHead(cfg, anchor_init=src.anchor_init), src.n)
    info = load_checkpoint(ck, module, None)
    assert ImHeadConfig.from_json(info["config"]).local_hidden == 40
    assert info["step"] == 1
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "2"])  # resumed without the flag: the checkpoint's width
    info = read_info(ck)
    assert ImHeadConfig.from_json(info["config"]).local_hidden == 40 and info["step"] == 2


def test_schedule_on_minutes_is_not_cut_by_total_steps(tmp_path, one_thread):
    """With --schedule-minutes a piece runs to --max-steps (or --minutes) past --total-steps: a GPU piece was
    once cut at the default 20,000 steps, minutes before its time."""
    ck = tmp_path / "minutes"
    train.main(ARGS + ["--ckpt", str(ck), "--schedule-minutes", "5", "--total-steps", "2", "--max-steps", "4"])
    src = SphereSource(2)
    module = TrainModule(ImHead(ImHeadConfig(**train.TINY), anchor_init=src.anchor_init), src.n)
    assert load_checkpoint(ck, module, None)["step"] == 4


def test_grown_warp_encoding_computes_the_same_warp(one_thread):
    """Finer warp octaves (--warp-pe-freqs) start as the same function: the new sin/cos inputs get zero weights."""
    torch.manual_seed(0)
    small = ImHead(ImHeadConfig(**(train.TINY | {"warp_pe_freqs": 6})))
    for p in small.warp_net.parameters():  # the last layer starts at zero: make every layer matter
        torch.nn.init.normal_(p, std=0.3)
    big = ImHead(ImHeadConfig(**(train.TINY | {"warp_pe_freqs": 8})))
    state = {k: train.grown_warp_input(v, 6, 8) if k == "warp_net.0.weight" else v
             for k, v in small.state_dict().items()}
    big.load_state_dict(state)
    x = torch.rand(2, 500, 3) * 0.4 - 0.2
    z_exp, z_id = torch.rand(2, small.cfg.n_expressions), torch.randn(2, small.cfg.id_dim)
    with torch.no_grad():
        ref, got = small.warp(x, z_exp, z_id), big.warp(x, z_exp, z_id)
    assert ref.abs().mean() > 1e-3
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_resume_grows_the_warp_encoding(tmp_path, one_thread):
    """A checkpoint resumes with more warp octaves (weights and Adam moments grown), then keeps them."""
    ck = tmp_path / "warp"
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "1"])
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "2", "--warp-pe-freqs", "8"])
    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "3"])  # no flag: the checkpoint's octaves
    info = read_info(ck)
    assert ImHeadConfig.from_json(info["config"]).warp_pe_freqs == 8 and info["step"] == 3
    with pytest.raises(SystemExit):  # fewer octaves would drop what was learned
        train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "4", "--warp-pe-freqs", "6"])


@pytest.mark.parametrize("bad", [["--n-train", "0"], ["--local-hidden", "0"], ["--detail-weight", "0"],
                                 ["--warp-pe-freqs", "-1"]])
def test_capacity_options_reject_bad_values(bad, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--ckpt", str(tmp_path / "x")] + bad)


def test_widened_warm_start_computes_the_shipped_function(one_thread):
    """Wider local networks and finer warp octaves warm-started from the shipped weights give the same SDF and
    warp (capacity study: the wide run starts where the shipped one stopped), and the new units are live."""
    from backend.weights import load_model

    loaded = load_model(WEIGHTS)
    cfg = loaded.config
    wide_cfg = ImHeadConfig.from_json(cfg.to_json())
    wide_cfg.local_hidden = cfg.local_hidden + 32
    wide_cfg.warp_pe_freqs = cfg.warp_pe_freqs + 2
    anchors = torch.zeros(cfg.n_regions, 3)
    narrow = TrainModule(ImHead(cfg, anchor_init=anchors), 1, id_coeff_dim=100)
    wide = TrainModule(ImHead(wide_cfg, anchor_init=anchors), 1, id_coeff_dim=100)
    train.warm_start(narrow, WEIGHTS, seed=0)
    train.warm_start(wide, WEIGHTS, seed=0)
    assert wide.model.loc_wh[0].shape[-1] == cfg.local_hidden + 32
    g = torch.Generator().manual_seed(3)
    z = loaded.extras["id_mean"] + loaded.extras["id_chol"] @ torch.randn(cfg.id_dim, generator=g)
    x = (torch.rand(1, 500, 3, generator=g) - 0.5) * 0.3
    zr, k = narrow.model.decode(z[None])
    ref = narrow.model.sdf(x, zr, k)
    zr_w, k_w = wide.model.decode(z[None])
    out = wide.model.sdf(x, zr_w, k_w)
    assert (out - ref).abs().max() < 1e-6
    z_exp = torch.rand(1, cfg.n_expressions, generator=g)
    with torch.no_grad():   # finer warp octaves: the same expression warp
        w_ref, w_out = narrow.model.warp(x, z_exp, z[None]), wide.model.warp(x, z_exp, z[None])
    assert w_ref.abs().max() > 1e-3 and (w_out - w_ref).abs().max() < 1e-7
    out.sum().backward()
    grad = wide.model.loc_wo.grad
    assert grad is not None and grad[:, cfg.local_hidden:].abs().max() > 0   # the new units already learn
    with pytest.raises(SystemExit):   # narrowing is not a warm start
        small_cfg = ImHeadConfig.from_json(cfg.to_json())
        small_cfg.local_hidden = cfg.local_hidden - 32
        train.warm_start(TrainModule(ImHead(small_cfg, anchor_init=anchors), 1, id_coeff_dim=100), WEIGHTS, 0)


def test_warm_restart_ramps_the_learning_rate_up_again(tmp_path, one_thread):
    """--restart-minutes starts the cosine again at that cumulative time: right after it the LR is on the
    restart's one-minute ramp (5 % of --lr upwards), not at the value the schedule from 0 would give (≈ --lr)."""
    with pytest.raises(SystemExit):
        train.parse_args(ARGS + ["--ckpt", str(tmp_path / "x"), "--schedule-minutes", "5", "--restart-minutes", "5"])
    with pytest.raises(SystemExit):
        train.parse_args(ARGS + ["--ckpt", str(tmp_path / "x"), "--restart-minutes", "1"])
    for name, extra in (("plain", []), ("restart", ["--restart-minutes", "0"])):
        train.main(ARGS + ["--ckpt", str(tmp_path / name), "--schedule-minutes", "60", "--max-steps", "41"] + extra)
    lr = {name: [json.loads(line)["lr"] for line in open(tmp_path / f"{name}.log.jsonl")][-1]
          for name in ("plain", "restart")}
    assert lr["plain"] == pytest.approx(2e-3, rel=1e-2)
    assert 0.05 * 2e-3 <= lr["restart"] < 0.5 * 2e-3
