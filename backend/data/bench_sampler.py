"""Sampler throughput table (training data speed; not a test):

    python -m backend.data.bench_sampler --ict .data/ict.safetensors --device cuda --batch 16 --ns 2048 --nq 2048

Prints, per SDF implementation (--impl: the torch path and the fused Triton kernel, sdf_kernel.py) and batch
size, milliseconds per batch (median of --iters after one warm-up), samples/s and signed-distance queries/s,
plus the estimated share of the two signed-distance queries (timed again separately, so it is noisy). The
kernel's first batch compiles it (the warm-up). --block/--warps/--beta/--super override the kernel's
tuning constants for a sweep.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import sdf_kernel
from .sampler import HeadSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ict", type=Path, default=Path(".data/ict.safetensors"),
                   help="converted ICT-FaceKit file (default: %(default)s)")
    p.add_argument("--atlas", type=Path, default=None, help="region atlas (default: the shipped one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes (default: %(default)s)")
    p.add_argument("--ns", type=int, default=2048, help="surface points per sample (default: %(default)s)")
    p.add_argument("--nq", type=int, default=2048, help="space points per sample and mesh (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="timed batches after one warm-up (default: %(default)s)")
    p.add_argument("--impl", nargs="+", choices=["torch", "triton"], default=None,
                   help="SDF implementations to time, one row each (default: torch, and triton where it runs)")
    p.add_argument("--block", type=int, default=sdf_kernel.BLOCK,
                   help="kernel: points per program (default: %(default)s)")
    p.add_argument("--warps", type=int, default=sdf_kernel.NUM_WARPS,
                   help="kernel: warps per program (default: %(default)s)")
    p.add_argument("--beta", type=float, default=sdf_kernel.BETA,
                   help="kernel: far-field criterion in cluster radii (default: %(default)s)")
    p.add_argument("--super", type=int, default=sdf_kernel.SUPER,
                   help="kernel: clusters per supercluster (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    impls = args.impl or (["torch", "triton"] if sdf_kernel.available(device) else ["torch"])
    if "triton" in impls and not sdf_kernel.available(device):
        p.error(f"the triton SDF kernel cannot run on {device} (needs triton and CUDA, or TRITON_INTERPRET=1)")
    sampler = HeadSampler(args.ict, args.atlas, device=device, sdf_impl="torch")
    sdf_kernel.BLOCK, sdf_kernel.NUM_WARPS, sdf_kernel.BETA, sdf_kernel.SUPER = (args.block, args.warps, args.beta,
                                                                                 args.super)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; Ns={args.ns} surface, Nq={args.nq} space points per sample (posed and canonical)")
    if "triton" in impls:
        print(f"kernel: block {args.block}, warps {args.warps}, beta {args.beta}, super {args.super}")
    print(f"{'impl':>6} {'batch':>5} {'ms/batch':>10} {'samples/s':>10} {'sdf queries/s':>14} {'sdf share~':>10}")
    for impl, b in ((i, b) for i in impls for b in args.batch):
        sampler.sdf_impl = impl
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
        print(f"{impl:>6} {b:>5} {ms:>10.1f} {b / ms * 1e3:>10.1f} {2 * b * args.nq / ms * 1e3:>14.0f} {share:>10.0%}")
    if len(impls) == 2:
        _agreement(sampler, args.batch[0], args.ns, args.nq)
    return 0


def _agreement(sampler: HeadSampler, b: int, ns: int, nq: int) -> None:
    """The kernel against the torch path on one batch's meshes and space points (same exposure masks)."""
    sampler.sdf_impl = "torch"
    batch = sampler.batch(b, ns, nq, torch.Generator().manual_seed(12345))
    posed, canon = sampler.meshes(batch["id_coeffs"], batch["exp_weights"])
    for name, pts, verts in (("posed", batch["space_posed"], posed), ("canonical", batch["canon_space"], canon)):
        sampler.sdf_impl = "torch"
        exposed = sampler.exposed_faces(verts)
        ref = sampler.signed_distance(pts, verts, exposed)
        sampler.sdf_impl = "triton"
        exposed_k = sampler.exposed_faces(verts)
        sdf = sampler.signed_distance(pts, verts, exposed)
        print(f"agreement ({name}, batch {b}): exposed faces differ {int((exposed != exposed_k).sum())}, "
              f"|sdf| max diff {float((sdf.abs() - ref.abs()).abs().max()):.2e} m, "
              f"signs differ {int(((sdf < 0) != (ref < 0)).sum())} of {ref.numel()}")


if __name__ == "__main__":
    raise SystemExit(main())
