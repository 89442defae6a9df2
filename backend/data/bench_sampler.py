"""Sampler throughput table (training data speed; not a test):

    python -m backend.data.bench_sampler --ict .data/ict.safetensors --device cuda --batch 16 --ns 2048 --nq 2048

Prints, per configuration, milliseconds per batch (median of --iters after one warm-up) and samples/s,
plus the estimated share of the two signed-distance queries (timed again separately, so it is noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .sampler import HeadSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ict", type=Path, default=Path(".data/ict.safetensors"))
    p.add_argument("--atlas", type=Path, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--ns", type=int, default=2048)
    p.add_argument("--nq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sampler = HeadSampler(args.ict, args.atlas, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; Ns={args.ns} surface, Nq={args.nq} space points per sample (posed and canonical)")
    print(f"{'batch':>5} {'ms/batch':>10} {'samples/s':>10} {'sdf queries/s':>14} {'sdf share~':>10}")
    for b in args.batch:
        times, sdf_times = [], []
        for it in range(args.iters + 1):
            gen = torch.Generator().manual_seed(it)
            _sync(device)
            t0 = time.perf_counter()
            batch = sampler.batch(b, args.ns, args.nq, gen)
            _sync(device)
            t1 = time.perf_counter()
            posed, _ = sampler.meshes(batch["id_coeffs"], batch["exp_weights"])
            sampler.signed_distance(batch["space_posed"], posed)
            _sync(device)
            t2 = time.perf_counter()
            if it:
                times.append(t1 - t0)
                sdf_times.append(2 * (t2 - t1))
        ms = statistics.median(times) * 1e3
        share = statistics.median(sdf_times) / statistics.median(times)
        print(f"{b:>5} {ms:>10.1f} {b / ms * 1e3:>10.1f} {2 * b * args.nq / ms * 1e3:>14.0f} {share:>10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
