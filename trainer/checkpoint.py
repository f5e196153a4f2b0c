"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step_<n>/` holding the LoRA weights (fp32, PEFT names, safetensors) and
state.pt: the keys of STATE_KEYS, captured and restored here and nowhere else. It is written under a temporary
name, flushed to the disk and renamed, so an interrupted save never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import fsync_dir, fsync_file
from .config import ConfigError
from .network import load_lora_state, lora_state

STATE_KEYS = (
    "step", "epoch", "batch_index",  # the position: optimiser steps done, and the next micro-batch to train
    "optimizer", "scheduler",        # their state_dicts
    "noise_rng",                     # the shared generator of noise and timesteps
    "torch_rng", "cuda_rng",         # every process's CPU and CUDA RNG (LoRA dropout), in process order
    "grad_scaler",                   # fp16: the loss scale reached ({} without a scaler)
    "run_info",                      # what the export's metadata needs (metadata.RunInfo as a dict): export_run.py
)


@dataclass
class Position:
    """Where a run is: `step` optimiser steps done; `batch_index` names the next micro-batch of `epoch`."""
    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoint_lora(run_dir: Path, name: str, step: int) -> Path:
    """A checkpoint's loadable LoRA (kohya format, full metadata): kept when checkpoint folders are pruned."""
    return run_dir / "loras" / f"{name}-step{step:06d}.safetensors"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*[0-9]"))
    done = [p for p in found if (p / "state.pt").exists()]
    return done[-1] if done else None


def capture(position: Position, parts: dict[str, torch.nn.Module], optimizer, scheduler,
            noise_rng: torch.Generator, accelerator, run_info: dict | None = None
            ) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """(LoRA weights per part, state) on the main process, None on the others. Every process must call it:
    each one's RNG states are gathered into the one checkpoint the main process writes."""
    device, world = accelerator.device, accelerator.num_processes

    def every_process(rng: torch.Tensor) -> list[torch.Tensor]:
        return list(accelerator.gather(rng.unsqueeze(0).to(device)).cpu() if world > 1 else rng.unsqueeze(0))
    torch_rng = every_process(torch.get_rng_state())
    cuda_rng = every_process(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
    if not accelerator.is_main_process:
        return None
    lora = {name: lora_state(model) for name, model in parts.items()}
    state = {"step": position.step, "epoch": position.epoch, "batch_index": position.batch_index,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "noise_rng": noise_rng.get_state(), "torch_rng": torch_rng, "cuda_rng": cuda_rng,
             "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
             "run_info": run_info or {}}
    assert tuple(state) == STATE_KEYS
    return lora, state


def restore(path: Path, parts: dict[str, torch.nn.Module], optimizer, scheduler, noise_rng: torch.Generator,
            accelerator) -> Position:
    """Puts a checkpoint's weights, optimiser, schedule and RNGs back; returns the position to continue from."""
    lora, state = load_checkpoint(path)
    rank, device = accelerator.process_index, accelerator.device
    for name, model in parts.items():
        load_lora_state(model, lora[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    noise_rng.set_state(state["noise_rng"])
    # A run resumed on fewer processes than it was saved from continues with the last process's RNG.
    torch.set_rng_state(state["torch_rng"][min(rank, len(state["torch_rng"]) - 1)])
    if device.type == "cuda" and state.get("cuda_rng"):  # LoRA dropout on the GPU draws from its generator
        torch.cuda.set_rng_state(state["cuda_rng"][min(rank, len(state["cuda_rng"]) - 1)], device)
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    return Position(state["step"], state["epoch"], state["batch_index"])


def find_resume_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; start the run without --resume")
    return ckpt


def save_checkpoint(run_dir: Path, step: int, lora: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 3) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        flat = {f"{part}::{key}": t.contiguous() for part, tensors in lora.items() for key, t in tensors.items()}
        save_file(flat, str(tmp / "lora.safetensors"))
        torch.save(state, tmp / "state.pt")
        for f in (tmp / "lora.safetensors", tmp / "state.pt"):
            fsync_file(f)
        fsync_dir(tmp)
    except BaseException:  # a full disk: no half-written folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(final.parent)
    # Keep the newest few: LoRA checkpoints are small, but optimiser state doubles them.
    for old in sorted((Path(run_dir) / "checkpoints").glob("step_*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(Path(path) / "lora.safetensors")).items():
        part, name = key.split("::", 1)
        lora.setdefault(part, {})[name] = t
    # Our own file, but still no pickle code execution: state holds tensors, numbers and strings only.
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    return lora, state
