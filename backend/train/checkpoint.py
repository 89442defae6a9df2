"""Training checkpoints without pickle: safetensors files plus JSON metadata.

A checkpoint is a folder with
  state.safetensors   model.* (float32), codes (float32), rng.* (uint8 RNG states)
  optim.safetensors   Adam moments in bfloat16 (halves the size so a checkpoint travels in <= 16 MB files)
  both carry metadata "train" = JSON {step, samples, elapsed_s, config, args, ...}
Written to a temporary folder and renamed, so an interrupted write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_checkpoint(folder: Path, module: nn.Module, opt: torch.optim.Optimizer, info: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"train": json.dumps(info)}
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(state, tmp / "state.safetensors", metadata=meta)

    names = {id(p): n for n, p in module.named_parameters()}
    optim: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            optim[f"{n}.exp_avg"] = st["exp_avg"].detach().to(torch.bfloat16).contiguous().cpu()
            optim[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().to(torch.bfloat16).contiguous().cpu()
            optim[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    save_file(optim, tmp / "optim.safetensors", metadata=meta)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def load_checkpoint(folder: Path, module: nn.Module, opt: torch.optim.Optimizer | None,
                    adapt: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Restore module (and optimizer moments if given) in place; returns the saved info dict. `adapt(name,
    tensor)` may reshape a saved parameter (and, with the same name, its Adam moments) for a grown module."""
    folder = Path(folder)
    state = load_file(folder / "state.safetensors")
    rng_cpu = state.pop("rng.cpu", None)
    rng_cuda = state.pop("rng.cuda", None)
    if adapt is not None:
        state = {k: adapt(k, v) for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    if rng_cpu is not None:
        torch.set_rng_state(rng_cpu)
    if rng_cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_cuda)
    if opt is not None and (folder / "optim.safetensors").exists():
        saved = load_file(folder / "optim.safetensors")
        names = {id(p): n for n, p in module.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                if f"{n}.exp_avg" not in saved:
                    continue
                on_device = group.get("fused") or group.get("capturable")
                moments = {m: saved[f"{n}.{m}"] for m in ("exp_avg", "exp_avg_sq")}
                if adapt is not None:
                    moments = {m: adapt(n, v.float()) for m, v in moments.items()}
                opt.state[p] = {"step": saved[f"{n}.step"].reshape(()).to(p.device if on_device else "cpu")}
                opt.state[p].update({m: v.to(p.device, p.dtype) for m, v in moments.items()})
    return read_info(folder)


def read_info(folder: Path) -> dict:
    """A checkpoint's info dict (step, samples, config JSON, ...) without loading its tensors."""
    with open(Path(folder) / "state.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return json.loads(header["__metadata__"]["train"])
