"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step_<n>/` holding the LoRA weights (fp32, PEFT names, safetensors) and
state.pt (optimiser, LR schedule, RNG states, position in the data stream). It is written under a temporary
name and renamed, so an interrupted save never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))
    done = [p for p in found if (p / "state.pt").exists()]
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, step: int, lora: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 3) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat = {f"{part}::{key}": t.contiguous() for part, tensors in lora.items() for key, t in tensors.items()}
    save_file(flat, str(tmp / "lora.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # Keep the newest few: LoRA checkpoints are small, but optimiser state doubles them.
    for old in sorted((run_dir / "checkpoints").glob("step_*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "lora.safetensors")).items():
        part, name = key.split("::", 1)
        lora.setdefault(part, {})[name] = t
    # Our own file, but still no pickle code execution: state holds tensors, numbers and strings only.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return lora, state
