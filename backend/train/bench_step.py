"""Training-step benchmark: the original step against the fast one, in one run, on one GPU.

    python -m backend.train.bench_step --batch 16 --ns 2048 --nq 2048 [--init-weights weights]

Rows: the sampler's batch; the original step (double backward through autograd, eager); the analytic-gradient
step eager and under torch.compile; the training loop as `train.py` runs it (compiled step, batches
prefetched on a side stream); and the same two for the fused-kernel step (`--step fused`: fused_local's Triton
kernels for the local networks; its FLOP column repeats the analytic step's count, which the flop counter
cannot see inside the kernels); then the local networks alone, torch.compile against the fused kernels
(forward under bf16 autocast and backward; samples/s there is the batch over that time). Columns: step ms
(median), samples/s, SDF queries/s, peak GPU memory, matmul FLOPs per step (torch's flop counter, forward +
backward) and the fraction of the bf16 matmul rate measured on this GPU. Before the table, both steps' losses
from the same weights on the same batches over --steps Adam steps ("equal loss per step"), and the fused
step's against the analytic one's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..model import ImHead, ImHeadConfig
from . import fused_local
from .fast_step import FastTrainModule, features_with_jacobian
from .ict_source import IctSource
from .losses import LossWeights, TrainModule
from .train import ID_COEFFS, Prefetcher, warm_start


def _median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def bf16_matmul_rate(device: torch.device) -> float:
    """Measured dense bf16 matmul FLOP/s (8192^3 products, median of 20)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, 3, 20)
    return 2 * n**3 / (ms * 1e-3)


@functools.cache
def _sizes(init: Path | None) -> dict[str, Any]:
    """The widths warm_start lets differ from the defaults, as the --init-weights file has them."""
    if init is None:
        return {}
    from ..weights import load_model

    cfg = load_model(init).config
    return {"local_hidden": cfg.local_hidden, "warp_pe_freqs": cfg.warp_pe_freqs}


def make(cls: type[TrainModule], src: IctSource, init: Path | None, device: torch.device,
         **kw: Any) -> TrainModule:
    cfg = ImHeadConfig(mirror_pairs=src.mirror_pairs, **_sizes(init))
    module = cls(ImHead(cfg, src.anchor_init), src.n_train, id_coeff_dim=ID_COEFFS, **kw)
    if init is not None:
        warm_start(module, init, seed=0)
    return module.to(device)


def step_fn(module: TrainModule, opt: torch.optim.Optimizer, net, batch_of, w: LossWeights):
    def step() -> float:
        batch = batch_of()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = net(batch, w, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        return loss.detach()
    return step


def count_flops(module: TrainModule, batch: dict, w: LossWeights) -> float:
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module(batch, w, None)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _cfg_name(fc: dict[str, int]) -> str:
    return ",".join(str(v) for v in fc.values())


def features_rows(src: IctSource, args: argparse.Namespace, dev: torch.device, fused_configs: list[dict[str, int]],
                  check: bool = False) -> list[tuple[str, float, float | None, int | None]]:
    """The local networks alone (features_with_jacobian, forward under bf16 autocast and backward): torch.compile
    against the fused kernels, on a step's worth of queries around the anchors. With `check`, each fused
    configuration's feat, tfeat and x gradient are also compared with torch.compile's (relative norm)."""
    m = make(FastTrainModule, src, args.init_weights, dev).model
    g = torch.Generator(device=dev).manual_seed(0)
    B, Q = args.batch, 2 * (args.ns + args.nq)
    with torch.no_grad():
        zr, k = m.decode(0.05 * torch.randn(B, m.cfg.id_dim, device=dev, generator=g))
        x = torch.gather(k, 1, torch.randint(0, m.cfg.n_regions, (B, Q, 1), device=dev, generator=g).expand(-1, -1, 3))
        x = x + 0.02 * torch.randn(x.shape, device=dev, generator=g)
    gf = torch.randn(B, Q, m.cfg.feat_dim, device=dev, generator=g)
    gt = torch.randn(B, Q, 3, m.cfg.feat_dim, device=dev, generator=g)
    xr = x.requires_grad_()

    def once(fn: Callable) -> list[torch.Tensor]:
        xr.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f, t = fn(m, xr, zr, k)
        ((f * gf).sum() + (t * gt).sum()).backward()
        return [f.detach(), t.detach(), xr.grad]

    def timed(fn: Callable) -> float:
        return _median_ms(lambda: once(fn), args.warmup + 2, args.repeat)

    out: list[tuple[str, float, float | None, int | None]] = []
    compiled = torch.compile(features_with_jacobian)
    try:
        out.append(("local features fwd+bwd only: torch.compile", timed(compiled), None, None))
        print(out[-1], flush=True)
    except Exception:
        traceback.print_exc()
    ref = once(compiled) if check else []
    for fc in fused_configs:
        fused_local.CONFIG.update(fc)
        try:  # one failing configuration (e.g. out of shared memory) should not cost the others
            t0 = time.perf_counter()
            got = once(fused_local.fused_features_with_jacobian)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            label = f"local features fwd+bwd only: fused kernels, config {_cfg_name(fc)}"
            if check:
                errs = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
                label += f" (first call incl. compile {first:.0f} s; vs torch.compile feat/tfeat/dx " + \
                    "/".join(f"{e:.1e}" for e in errs) + ")"
            out.append((label, timed(fused_local.fused_features_with_jacobian), None, None))
            print(out[-1], flush=True)
        except Exception:
            traceback.print_exc()
    fused_local.CONFIG.update(fused_configs[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ict", type=Path, default=Path(".data/ict.safetensors"))
    p.add_argument("--init-weights", type=Path, default=None, help="start both steps from these weights")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ns", type=int, default=2048)
    p.add_argument("--nq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="Adam steps of the equal-loss comparison")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--fused-config", action="append", default=None, metavar="FB,FW,BB,BW,BP[,SPLIT,HC,STAGES]",
                   help="fused kernels' forward block and warps, backward block, warps and points per program, "
                        "backward in two passes (1) or one (0), forward hidden chunk, pipelining stages (default "
                        f"{','.join(str(v) for v in fused_local.CONFIG.values())}; left-out trailing values keep "
                        "the default); repeat it for one step row and one features row per configuration (the "
                        "first one is used elsewhere)")
    p.add_argument("--no-fused", action="store_true", help="leave out the fused-kernel rows")
    p.add_argument("--local-only", action="store_true",
                   help="only the local features fwd+bwd rows (torch.compile and each --fused-config), each "
                        "fused configuration also checked against torch.compile's output")
    args = p.parse_args(argv)
    default = dict(fused_local.CONFIG)
    fused_configs = [{**default, **dict(zip(default, (int(v) for v in c.split(","))))}
                     for c in args.fused_config or []]
    if any(not 5 <= len(c.split(",")) <= len(default) for c in args.fused_config or []):
        p.error(f"--fused-config takes 5 to {len(default)} integers")
    fused_configs = fused_configs or [default]
    fused_local.CONFIG.update(fused_configs[0])
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    src = IctSource(args.ict, None, dev)
    if args.local_only:
        for label, row_ms, _, _ in features_rows(src, args, dev, fused_configs, check=True):
            print(f"| {label} | {row_ms:.1f} ms |")
        return 0
    w = LossWeights()
    name = torch.cuda.get_device_name(dev)
    rate = bf16_matmul_rate(dev)
    print(f"{name}: measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s", flush=True)

    def draw(at: int) -> dict[str, torch.Tensor]:
        return src.batch(args.batch, args.ns, args.nq, torch.Generator().manual_seed(1000 + at), fresh_identities=True)

    batches = [draw(i) for i in range(args.steps)]

    # Equal loss per step: the same weights and batches through both steps.
    curves = {}
    variants: list[tuple[str, type[TrainModule], dict[str, Any]]] = [
        ("autograd", TrainModule, {}), ("analytic", FastTrainModule, {})]
    if not args.no_fused:
        variants.append(("fused", FastTrainModule, {"fused": True}))
    for label, cls, kw in variants:
        torch.manual_seed(0)
        module = make(cls, src, args.init_weights, dev, **kw)
        opt = torch.optim.Adam(module.parameters(), 1e-4, betas=(0.9, 0.99))
        it = iter(batches)
        step = step_fn(module, opt, module, lambda: next(it), w)
        try:
            curves[label] = [float(step()) for _ in batches]
        except Exception:  # a failing fused kernel should not cost the other rows on a lent GPU
            traceback.print_exc()
            curves[label] = [float("nan")] * len(batches)
    print("step | loss autograd | loss analytic | relative difference"
          + ("" if args.no_fused else " | loss fused | fused vs analytic"))
    for i, (a, b) in enumerate(zip(curves["autograd"], curves["analytic"])):
        if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
            line = f"{i:4d} | {a:.6g} | {b:.6g} | {abs(a - b) / abs(a):.2e}"
            if not args.no_fused:
                c = curves["fused"][i]
                line += f" | {c:.6g} | {abs(c - b) / abs(b):.2e}"
            print(line)

    rows: list[tuple[str, float, float | None, int | None]] = []  # (what, ms, matmul FLOPs, peak bytes)
    fixed = batches[0]
    rows.append(("sampler batch", _median_ms(lambda: draw(0), args.warmup, args.repeat), None, None))
    configs: list[tuple[str, type[TrainModule], bool, str | None, dict[str, int] | None]] = [
        ("original step (autograd double backward, eager)", TrainModule, False, None, None),
        ("analytic-gradient step, eager", FastTrainModule, False, None, None),
        ("analytic-gradient step, torch.compile", FastTrainModule, True,
         "training loop: compiled step + prefetched batches", None)]
    if not args.no_fused:
        for i, fused_cfg in enumerate(fused_configs):
            configs.append(("fused-kernel step, torch.compile"
                            + ("" if i == 0 else f", config {_cfg_name(fused_cfg)}"), FastTrainModule, True,
                            "training loop: fused step + prefetched batches" if i == 0 else None, fused_cfg))
    analytic_flops = None
    row_opt: Any = None
    row_net: Any = None
    for label, cls, compiled, loop_label, fc in configs:
        fused = fc is not None
        if fc is not None:
            fused_local.CONFIG.update(fc)
        module = make(cls, src, args.init_weights, dev, **({"fused": True} if fused else {}))
        try:
            # the flop counter cannot see inside Triton kernels: the fused step does the analytic step's products
            flops = analytic_flops if fused and analytic_flops is not None else count_flops(module, fixed, w)
            if cls is FastTrainModule and not fused:
                analytic_flops = flops
            row_opt = torch.optim.Adam(module.parameters(), 1e-4, betas=(0.9, 0.99))
            row_net = torch.compile(module) if compiled else module
            torch.cuda.reset_peak_memory_stats(dev)
            ms = _median_ms(step_fn(module, row_opt, row_net, lambda: fixed, w), args.warmup + (3 if compiled else 0),
                            args.repeat)
            rows.append((label, ms, flops, torch.cuda.max_memory_allocated(dev)))
            print(rows[-1], flush=True)
            if loop_label is not None:
                state = iter(range(10**9))
                pre = Prefetcher(draw, dev, 0)
                torch.cuda.reset_peak_memory_stats(dev)
                loop_ms = _median_ms(step_fn(module, row_opt, row_net, lambda: pre.get(next(state)), w), args.warmup,
                                     args.repeat)
                pre.close()
                rows.append((loop_label, loop_ms, flops, torch.cuda.max_memory_allocated(dev)))
        except Exception:
            if not fused:
                raise
            traceback.print_exc()  # keep the other rows
        del module
        row_opt = row_net = None
        torch.cuda.empty_cache()
    fused_local.CONFIG.update(fused_configs[0])
    if not args.no_fused:
        rows.extend(features_rows(src, args, dev, fused_configs))

    queries = args.batch * 2 * (args.ns + args.nq)
    base = rows[1][1]
    print(f"\n{name}, B = {args.batch}, Ns = Nq = {args.ns}/{args.nq} ({queries} SDF queries a step), "
          f"median of {args.repeat}")
    print("| what | step ms | samples/s | SDF queries/s | speed-up | peak GPU memory | matmul GFLOP/step "
          "| of bf16 rate |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row_ms, row_flops, peak in rows:
        if row_flops is None or peak is None:  # the sampler's and the features-only rows
            print(f"| {label} | {row_ms:.1f} | {args.batch / row_ms * 1e3:.0f} | | | | | |")
            continue
        print(f"| {label} | {row_ms:.1f} | {args.batch / row_ms * 1e3:.0f} | {queries / row_ms * 1e3 / 1e6:.1f} M "
              f"| {base / row_ms:.2f}x | {peak / 2**30:.1f} GiB | {row_flops / 1e9:.0f} "
              f"| {row_flops / (row_ms * 1e-3) / rate:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
