"""Auto-decoder training of ImHead, single process or DistributedDataParallel through torchrun.

    python -m backend.train.train --data ict --ckpt .ckpt/main --minutes 9           # one GPU or CPU
    torchrun --nproc_per_node 2 -m backend.train.train --data ict --ckpt .ckpt/ddp   # two GPUs

Runs are cut into pieces: each invocation resumes from --ckpt if it exists, trains until --minutes or
--total-steps, and writes the checkpoint (also every --save-every minutes). Batches are drawn from a
generator seeded by (seed, rank, step), so a resumed run sees the batches the uninterrupted one would.
Logs: one JSON line per --log-every steps to stdout and <ckpt>.log.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import queue
import threading
from typing import Any, Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import ImHead, ImHeadConfig
from ..model.encoding import encoded_dim
from .checkpoint import load_checkpoint, read_info, save_checkpoint
from .fast_step import FastTrainModule
from .locality import SwapLocality
from .losses import LossWeights, TrainModule

TINY: dict[str, Any] = dict(local_hidden=32, feat_dim=16, fusion_hidden=32, dec_hidden=64, lm_hidden=16,
                             warp_hidden=32, warp_layers=2, tmpl_hidden=32, pe_freqs=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["ict", "synthetic"], default="ict")
    p.add_argument("--ict", type=Path, default=Path(".data/ict.safetensors"))
    p.add_argument("--atlas", type=Path, default=None, help="default: weights/atlas.safetensors")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this piece")
    p.add_argument("--save-every", type=float, default=3.0, help="minutes between checkpoints")
    p.add_argument("--total-steps", type=int, default=20000,
                   help="length of the LR schedule in steps, where the run stops (default: 20000; ignored with "
                        "--schedule-minutes)")
    p.add_argument("--schedule-minutes", type=float, default=None,
                   help="if set, the LR schedule runs on cumulative training minutes instead of steps")
    p.add_argument("--restart-minutes", type=float, default=None,
                   help="warm restart: the cosine of --schedule-minutes starts again (from --lr) at this many "
                        "cumulative training minutes, ramping up over its first minute (default: no restart)")
    p.add_argument("--max-steps", type=int, default=None, help="stop this piece after this global step")
    p.add_argument("--batch", type=int, default=16, help="identities per GPU per step")
    p.add_argument("--n-train", type=int, default=4096,
                   help="training identities of the ICT source's table (--identities table; default 4096; a "
                        "few for a capacity study: can the network fit them at all)")
    p.add_argument("--detail-weight", type=float, default=1.0,
                   help="sampling density of surface and near-surface points on lips, mouth corners, nose tip, "
                        "nostrils, lids and ears relative to elsewhere (default 1: uniform by area)")
    p.add_argument("--named-expressions", type=float, default=0.0,
                   help="share of expression samples that are one named shape at weight 1 (its _L/_R partner "
                        "too half the time) instead of a random mixture (default 0): the extremes, e.g. closed "
                        "lids at eyeBlink 1, that mixtures reach rarely")
    p.add_argument("--deform-motion-weight", type=float, default=0.0,
                   help="also weight each surface point's warp error by its ICT motion in cm, times this factor "
                        "(default 0: the plain mean): lids and lips that move far get their share of the loss")
    p.add_argument("--motion-sampling", type=float, default=0.0,
                   help="extra sampling density per cm an expression moves a triangle: weight 1 + F x motion in "
                        "cm on surface and near-surface points (default 0: by area only); a closing lid moves "
                        "~1 cm over a few mm of skin that area-weighted samples barely reach")
    p.add_argument("--locality-weight", type=float, default=0.0,
                   help="weight per metre of the region-swap locality term (backend/train/locality.py): the SDF "
                        "change on the surface outside a region's 1 cm margin when its code is swapped for another "
                        "head's (default 0: off); --data ict only")
    p.add_argument("--local-hidden", type=int, default=None,
                   help="width of the local networks' hidden layers (default: the checkpoint's when resuming, "
                        "else the model's, 96)")
    p.add_argument("--warp-pe-freqs", type=int, default=None,
                   help="octaves of the expression warp's positional encoding (default: the checkpoint's when "
                        "resuming, else the model's, 6); more than a checkpoint's grows it, computing the same warp")
    p.add_argument("--ns", type=int, default=2048, help="surface points per identity")
    p.add_argument("--nq", type=int, default=2048, help="space points per identity")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--code-lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--topk", type=int, default=0, help="regions evaluated per point (0: all; dense is faster on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="tiny network (CPU smoke runs, tests)")
    p.add_argument("--n-synthetic", type=int, default=8, help="identities of the synthetic source")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--step", choices=["analytic", "fused", "autograd"], default="analytic",
                   help="spatial gradients: analytic (the default: forward-mode, one backward; needs --topk 0), "
                        "fused (the analytic step with the local networks in Triton kernels, forward and "
                        "backward; CUDA and the shipped local architecture only) or autograd (double backward, "
                        "the original step)")
    p.add_argument("--identities", choices=["encoder", "table"], default="encoder",
                   help="identity codes: a linear encoder of fresh ICT coefficients each step, or an "
                        "auto-decoder table of the sampler's training identities")
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start a new run from these shipped weights' network (no effect when resuming)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
    p.add_argument("--no-prefetch", action="store_true", help="draw each batch in the loop, not on a side thread")
    args = p.parse_args(argv)
    if args.n_train < 1:
        p.error(f"--n-train must be at least 1, got {args.n_train}")
    if not args.detail_weight > 0:
        p.error(f"--detail-weight must be positive, got {args.detail_weight}")
    if not 0.0 <= args.named_expressions <= 1.0:
        p.error(f"--named-expressions must be in [0, 1], got {args.named_expressions}")
    if not args.deform_motion_weight >= 0:
        p.error(f"--deform-motion-weight must be >= 0, got {args.deform_motion_weight}")
    if not args.motion_sampling >= 0.0:
        p.error(f"--motion-sampling must be >= 0, got {args.motion_sampling}")
    if not args.locality_weight >= 0:
        p.error(f"--locality-weight must be >= 0, got {args.locality_weight}")
    if args.restart_minutes is not None and not (
            args.schedule_minutes and 0 <= args.restart_minutes < args.schedule_minutes):
        p.error("--restart-minutes needs --schedule-minutes and must lie in [0, --schedule-minutes)")
    if args.locality_weight > 0 and args.data != "ict":
        p.error("--locality-weight needs the atlas's regions: --data ict")
    if args.local_hidden is not None and args.local_hidden < 1:
        p.error(f"--local-hidden must be at least 1, got {args.local_hidden}")
    if args.warp_pe_freqs is not None and not 0 <= args.warp_pe_freqs <= 12:
        p.error(f"--warp-pe-freqs must be 0..12, got {args.warp_pe_freqs}")
    return args


def build_source(args: argparse.Namespace, device: torch.device):
    """(source, n_train, anchor_init, mirror_pairs). The ICT source is the data issue's sampler."""
    if args.data == "synthetic":
        from .synthetic import SphereSource

        src = SphereSource(args.n_synthetic, device=str(device), seed=args.seed)
        return src, src.n, src.anchor_init, []
    from .ict_source import IctSource

    ict = IctSource(args.ict, args.atlas, device, n_train=args.n_train, detail_weight=args.detail_weight,
                    p_named=args.named_expressions, motion_weight=args.motion_sampling)
    return ict, ict.n_train, ict.anchor_init, ict.mirror_pairs


ID_COEFFS = 100  # ICT identity modes


def make_module(args: argparse.Namespace, cfg: ImHeadConfig, anchor_init: torch.Tensor, n_train: int) -> TrainModule:
    if args.step != "autograd" and args.topk > 0:
        raise SystemExit(f"--step {args.step} evaluates all regions: use --topk 0 (or --step autograd)")
    coeff_dim = ID_COEFFS if args.identities == "encoder" else None
    model = ImHead(cfg, anchor_init=anchor_init)
    if args.step == "autograd":
        return TrainModule(model, n_train, id_coeff_dim=coeff_dim)
    try:
        return FastTrainModule(model, n_train, id_coeff_dim=coeff_dim, fused=args.step == "fused")
    except ValueError as e:  # the fused kernels' architecture limits
        raise SystemExit(f"--step fused: {e}") from e


def widened_local_state(small: dict[str, torch.Tensor], wide: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for a model with wider local networks that computes exactly what `small` computes: the new
    hidden units keep `wide`'s random initialisation on their inputs, and what they feed into is zero (the
    second layer's rows from new first-layer units, the output rows from new second-layer units), so every
    new unit is active and gets gradients from the first step without changing the function."""
    out = dict(wide)
    for key, old in small.items():
        new = wide[key]
        if old.shape == new.shape:
            out[key] = old.clone()
            continue
        grown = new.clone()
        if key.startswith(("loc_wx", "loc_wz", "loc_b", "loc_bh")):   # (..., H): new columns keep their init
            grown[..., :old.shape[-1]] = old
        elif key.startswith("loc_wh"):                                # (S, H, H): new units feed no old unit
            h = old.shape[1]
            grown[:, :h, :h] = old
            grown[:, h:, :h] = 0
        elif key.startswith("loc_wo"):                                # (S, H, F): rows from new units are zero
            h = old.shape[1]
            grown[:, :h] = old
            grown[:, h:] = 0
        else:
            raise ValueError(f"cannot widen {key}: {tuple(old.shape)} -> {tuple(new.shape)}")
        out[key] = grown
    return out


WARP_INPUT = "model.warp_net.0.weight"


def grown_warp_input(w: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """The warp network's first-layer weight (H, 3 + 6*old + C) for an encoding of `new` >= `old` octaves.
    The encoding is [x, sin (octave-major, 3 per octave), cos (likewise)], then C conditioning inputs; the new
    octaves' columns are zero, so the grown network computes the same warp and learns the finer octaves."""
    hidden, width = w.shape
    e_old, e_new = encoded_dim(old), encoded_dim(new)
    out = w.new_zeros(hidden, e_new + width - e_old)
    out[:, : 3 + 3 * old] = w[:, : 3 + 3 * old]                        # x and the old octaves' sines
    out[:, 3 + 3 * new : 3 + 3 * new + 3 * old] = w[:, 3 + 3 * old : e_old]  # the old octaves' cosines
    out[:, e_new:] = w[:, e_old:]                                      # expression weights and identity
    return out


@torch.no_grad()
def warm_start(module: TrainModule, weights_dir: Path, seed: int) -> None:
    """The network from shipped weights; an identity encoder starts as a random rank-100 map onto the
    weights' code distribution (mean + Cholesky factor times orthonormal columns), so the decoder sees codes
    of the spread it was trained on from the first step."""
    from ..weights import load_model

    loaded = load_model(weights_dir)
    cfg, old = module.model.cfg, loaded.config
    if dataclasses.replace(old, local_hidden=cfg.local_hidden, warp_pe_freqs=cfg.warp_pe_freqs) != cfg \
            or old.local_hidden > cfg.local_hidden or old.warp_pe_freqs > cfg.warp_pe_freqs:
        raise SystemExit(f"--init-weights config differs from this run's: {old} vs {cfg}")
    state = loaded.model.state_dict()
    if old.warp_pe_freqs < cfg.warp_pe_freqs:
        key = WARP_INPUT.removeprefix("model.")
        state[key] = grown_warp_input(state[key], old.warp_pe_freqs, cfg.warp_pe_freqs)
    if old.local_hidden < cfg.local_hidden:
        state = widened_local_state(state, module.model.state_dict())
    module.model.load_state_dict(state)
    if module.encodes_identities:
        g = torch.Generator().manual_seed(seed)
        dim = module.model.cfg.id_dim
        q, _ = torch.linalg.qr(torch.randn(dim, module.id_encoder.in_features, generator=g, dtype=torch.float64))
        module.id_encoder.weight.copy_((loaded.extras["id_chol"].double() @ q).float())
        module.id_encoder.bias.copy_(loaded.extras["id_mean"])


class Prefetcher:
    """Draws the batch of step s + 1 on a side thread (and CUDA stream) while step s trains. Batches are
    seeded per (seed, rank, step) exactly as in the loop, so a run sees the same data with or without it."""

    def __init__(self, draw, device: torch.device, first_step: int):
        self.draw, self.device = draw, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.out: queue.Queue = queue.Queue(maxsize=2)
        self.next_step = first_step
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        batch = self.draw(self.next_step)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    batch, event = self.draw(self.next_step), None
                self.out.put((self.next_step, batch, event))
                self.next_step += 1
        except BaseException as exc:  # surfaced in get()
            self.out.put((None, exc, None))

    def get(self, step: int) -> dict[str, torch.Tensor]:
        got, batch, event = self.out.get()
        if got is None:
            raise RuntimeError("batch prefetch failed") from batch
        if got != step:
            raise RuntimeError(f"prefetcher out of step: expected {step}, got {got}")
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for v in batch.values():
                v.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.out.get(timeout=0.1)
            except queue.Empty:
                pass


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.05 as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and torch.cuda.is_available():
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif world > 1:  # CPU processes (tests of the DDP path without GPUs)
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    elif args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(args.seed)
    source, n_train, anchor_init, mirror_pairs = build_source(args, device)
    sizes = dict(TINY if args.tiny else {})
    resuming = (args.ckpt / "state.safetensors").exists()
    saved_cfg = ImHeadConfig.from_json(read_info(args.ckpt)["config"]) if resuming else None
    for name in ("local_hidden", "warp_pe_freqs"):  # given, else the checkpoint's when resuming, else the model's
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
        elif saved_cfg is not None:
            sizes[name] = getattr(saved_cfg, name)
    cfg = ImHeadConfig(mirror_pairs=mirror_pairs, **sizes)
    module = make_module(args, cfg, anchor_init, n_train)
    if args.init_weights is not None and not resuming:
        warm_start(module, args.init_weights, args.seed)
    module = module.to(device)
    if args.locality_weight > 0:
        sampler = source.sampler
        module.locality = SwapLocality(sampler.neutral.cpu().numpy(), sampler.faces.cpu().numpy(),
                                       sampler.region.cpu().numpy(), cfg.n_regions, device=device)
    if args.step == "fused":
        from .fused_local import unsupported_reason

        reason = unsupported_reason(module.model, device)
        if reason is not None:
            raise SystemExit(f"--step fused: {reason}")
    code_params = module.id_encoder.parameters() if module.encodes_identities else module.codes.parameters()
    opt = torch.optim.Adam(
        [
            {"params": list(module.model.parameters()), "lr": args.lr, "base_lr": args.lr},
            {"params": list(code_params), "lr": args.code_lr, "base_lr": args.code_lr},
        ],
        betas=(0.9, 0.99),
    )
    info: dict[str, Any] = {"step": 0, "samples": 0, "elapsed_s": 0.0, "pieces": 0}
    if saved_cfg is not None:
        old, new = saved_cfg.warp_pe_freqs, cfg.warp_pe_freqs
        if dataclasses.replace(saved_cfg, warp_pe_freqs=new) != cfg or new < old:
            raise SystemExit(f"checkpoint config differs from this run's: {saved_cfg} vs {cfg}")

        def adapt(name: str, t: torch.Tensor) -> torch.Tensor:
            return grown_warp_input(t, old, new) if name == WARP_INPUT and new > old else t

        info = load_checkpoint(args.ckpt, module, opt, adapt)
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {info['step']}", flush=True)
    net: Callable[..., Any] = module  # the module, compiled or wrapped for DDP
    if args.compile:
        net = torch.compile(module)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[local] if device.type == "cuda" else None)
    weights = LossWeights(deform_motion=args.deform_motion_weight * LossWeights.deform, locality=args.locality_weight)
    topk = args.topk if args.topk > 0 else None

    step, samples = int(info["step"]), int(info["samples"])
    log_path = Path(str(args.ckpt) + ".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    t_save = t_start
    t_log, s_log, n_log = time.time(), step, 0
    acc: dict[str, float] = {}
    # A schedule on training minutes ends a piece by --minutes alone: --total-steps shapes a schedule on steps.
    step_limits = [s for s in (args.max_steps, None if args.schedule_minutes else args.total_steps) if s is not None]
    stop_step = min(step_limits) if step_limits else math.inf

    def save() -> None:
        if rank == 0:
            paths = {"ckpt": str(args.ckpt), "ict": str(args.ict), "atlas": str(args.atlas),
                     "init_weights": str(args.init_weights)}
            out = dict(info, step=step, samples=samples, config=cfg.to_json(), args=vars(args) | paths,
                       weights=weights.to_dict(), world=world,
                       elapsed_s=info["elapsed_s"] + time.time() - t_start, pieces=info.get("pieces", 0) + 1,
                       device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
            save_checkpoint(args.ckpt, module, opt, out)

    def schedule_progress() -> float:
        """Fraction of the LR schedule done; on training time it is taken from rank 0 so all ranks agree."""
        if not args.schedule_minutes:
            return (step - args.warmup) / max(1, args.total_steps - args.warmup)
        t = torch.tensor([(info["elapsed_s"] + time.time() - t_start) / 60], device=device)
        if world > 1:
            dist.broadcast(t, 0)
        start = args.restart_minutes or 0.0
        return (float(t) - start) / (args.schedule_minutes - start)

    fresh = args.identities == "encoder" and args.data == "ict"

    def draw(at_step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(hash((args.seed, rank, at_step)) % (2**63))
        if fresh:
            batch = source.batch(args.batch, args.ns, args.nq, gen, fresh_identities=True)
        else:
            batch = source.batch(args.batch, args.ns, args.nq, gen)
        if args.locality_weight > 0:  # drawn after the sampler's draws, which stay those of a run without it
            batch["swap_region"] = torch.randint(cfg.n_regions, (args.batch,), generator=gen).to(device)
        return batch

    prefetch = None if args.no_prefetch else Prefetcher(draw, device, step)
    progress = 0.0
    while step < stop_step and time.time() - t_start < args.minutes * 60:
        batch = draw(step) if prefetch is None else prefetch.get(step)
        if step % args.log_every == 0 or step == int(info["step"]):
            progress = schedule_progress()
        f = lr_factor(step, args.warmup, progress)
        if args.restart_minutes is not None:  # the restart's ramp: a minute from 5 % to the cosine
            f *= min(1.0, 0.05 + progress * (args.schedule_minutes - args.restart_minutes))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, terms = net(batch, weights, topk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        step += 1
        samples += args.batch * world
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["loss"] = acc.get("loss", 0.0) + loss.detach()
        n_log += 1
        if step % args.log_every == 0 or step == stop_step:
            vals = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float32) for v in acc.values()]) / n_log
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.time() - t_log
            rec = {"step": step, "lr": opt.param_groups[0]["lr"], "step_s": dt / (step - s_log),
                   "samples_per_s": (step - s_log) * args.batch * world / dt, "world": world}
            sampler = getattr(source, "sampler", None)
            if sampler is not None:
                rec["sdf_impl"] = sampler.sdf_impl
            rec.update({k: float(v) for k, v in zip(acc.keys(), vals.tolist())})
            if rank == 0:
                line = json.dumps(rec)
                print(line, flush=True)
                with open(log_path, "a") as fh:
                    fh.write(line + "\n")
            t_log, s_log, n_log, acc = time.time(), step, 0, {}
        if time.time() - t_save > args.save_every * 60:
            save()
            t_save = time.time()
    if prefetch is not None:
        prefetch.close()
    save()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
