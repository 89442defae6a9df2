"""Training on CPU with a tiny config: the real loop (checkpoint, resume) overfits analytic spheres."""

import json

import torch

from backend.model import ImHead, ImHeadConfig
from backend.train import train
from backend.train.checkpoint import load_checkpoint
from backend.train.losses import TrainModule
from backend.train.synthetic import SphereSource

ARGS = ["--data", "synthetic", "--tiny", "--batch", "2", "--ns", "128", "--nq", "128", "--total-steps", "160",
        "--log-every", "40", "--warmup", "10", "--lr", "2e-3", "--code-lr", "1e-2", "--n-synthetic", "2",
        "--topk", "4", "--minutes", "10"]


def _errors_mm(module: TrainModule, src: SphereSource) -> tuple[float, float]:
    b = src.batch(src.n, 2000, 2000, torch.Generator().manual_seed(123))
    with torch.no_grad():
        zr, k = module.model.decode(module.codes(b["id_index"]))
        surf = module.model.sdf(b["surf_canon"], zr, k, topk=4).abs().mean()
        near = b["canon_sdf"].abs() < 0.01
        space = (module.model.sdf(b["canon_space"], zr, k, topk=4) - b["canon_sdf"]).abs()[near].mean()
    return float(surf) * 1e3, float(space) * 1e3


def test_tiny_model_overfits_spheres_with_resume(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two on a shared, loaded CPU
    try:
        _overfit(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _overfit(tmp_path):
    ck = tmp_path / "ck"
    src = SphereSource(2)
    fresh = TrainModule(ImHead(ImHeadConfig(**train.TINY), anchor_init=src.anchor_init), src.n)
    surf0, _ = _errors_mm(fresh, src)
    assert surf0 > 10.0  # the prior sphere is far from both targets

    train.main(ARGS + ["--ckpt", str(ck), "--max-steps", "80"])  # first piece, cut short
    train.main(ARGS + ["--ckpt", str(ck)])  # resumes and finishes the schedule
    module = TrainModule(ImHead(ImHeadConfig(**train.TINY), anchor_init=src.anchor_init), src.n)
    info = load_checkpoint(ck, module, None)
    assert info["step"] == 160 and info["pieces"] == 2
    log = [json.loads(line) for line in (tmp_path / "ck.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [40, 80, 120, 160]
    surf, space = _errors_mm(module, src)
    assert surf < 2.0, surf
    assert space < 2.5, space
