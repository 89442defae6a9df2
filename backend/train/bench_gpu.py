"""Time the training pieces on one GPU: sampler batch, and a full train step (AMP bf16) per topk setting.

    python -m backend.train.bench_gpu --batch 16 --ns 2048 --nq 2048
Prints a table (median of --repeat after --warmup); used to pick the training configuration.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..model import ImHead, ImHeadConfig
from .ict_source import IctSource
from .losses import LossWeights, TrainModule


def _time(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ns", type=int, default=2048)
    p.add_argument("--nq", type=int, default=2048)
    p.add_argument("--topk", type=int, nargs="+", default=[0, 8, 4])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    src = IctSource(".data/ict.safetensors", None, dev)
    print(f"sampler init {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name(dev)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = [("sampler batch", _time(lambda: src.batch(args.batch, args.ns, args.nq, gen), args.warmup, args.repeat))]
    print(rows[-1], flush=True)
    batch = src.batch(args.batch, args.ns, args.nq, gen)
    module = TrainModule(ImHead(ImHeadConfig(mirror_pairs=src.mirror_pairs), src.anchor_init), src.n_train).to(dev)
    opt = torch.optim.Adam(module.parameters(), 1e-4)
    w = LossWeights()
    for k in args.topk:
        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module(batch, w, k if k > 0 else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        torch.cuda.reset_peak_memory_stats()
        rows.append((f"train step topk={k or 'all'}", _time(step, args.warmup, args.repeat)))
        print(rows[-1], f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    print(f"\n| what (B={args.batch}, Ns={args.ns}, Nq={args.nq}) | median ms | identities/s |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.1f} | {args.batch / t:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
