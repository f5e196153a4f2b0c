"""A run folder belongs to one run: claimed (locked) for the length of a training, never written by a second
one, never taken over by a new run while it holds another run's checkpoints, and resumed only with a config that
continues the same training.

What may change on --resume: how long to train and what to do along the way (steps, epochs, samples, checkpoint
intervals, where the LoRA goes, memory-only settings). Anything else (seed, data, network, optimiser...) would
silently make a different run out of the saved one, so it is refused with the differences named.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TrainConfig, load_config
from .locks import Lock, output_lock, run_lock

# Keys a resumed run may change (section.key, or a whole section).
RESUMABLE = {
    "training.steps", "training.epochs", "training.max_nonfinite_steps", "training.attention_memory_mb",
    "training.return_freed_memory", "training.gradient_checkpointing", "data.cache_latents",
    "model.base_model",  # the same weights may have moved; its identity is in the checkpoint's metadata
    "sample", "output",
}


class RunFolderError(ConfigError):
    """The run folder holds another run, or --resume would continue it with another config."""


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """`section.key: old → new` for every key outside RESUMABLE that differs."""
    out = []
    old_d, new_d = saved.to_dict(), new.to_dict()
    for section, values in new_d.items():
        if section in RESUMABLE:
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE and old_d[section].get(key) != value:
                out.append(f"{name}: {old_d[section].get(key)!r} → {value!r}")
    return out


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (Path(run_dir) / "checkpoints").glob("step_*[0-9]")
                  if (p / "state.pt").is_file())


def check_ownership(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuses a fresh run over another run's checkpoints and a resume with a different config; --overwrite
    clears the old run's checkpoints, samples and events (the user asked for exactly that)."""
    run_dir = cfg.run_path()
    steps = checkpoint_steps(run_dir)
    if resume:
        if overwrite:
            raise RunFolderError("--resume continues the run in the folder and --overwrite deletes it: pass one")
        saved_path = run_dir / "config.toml"
        if steps and saved_path.is_file():
            diffs = config_differences(load_config(saved_path), cfg)
            if diffs:
                shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                raise RunFolderError(f"--resume would continue the run in {run_dir} with another config ({shown}); "
                                     "resume with its own config.toml, or start a new run under another name")
        return
    if steps and not overwrite:
        raise RunFolderError(f"{run_dir} holds another run's checkpoints (up to step {steps[-1]}); continue it with "
                             "--resume, choose another name (--output / output.run_dir), or pass --overwrite to "
                             "delete them")
    # A fresh run: nothing of an earlier one may mix into its events, samples or checkpoints.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "samples", ignore_errors=True)
    (run_dir / "events.jsonl").unlink(missing_ok=True)


@dataclass
class Claim:
    """The locks a training holds: its run folder and its output file."""
    locks: list[Lock] = field(default_factory=list)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def claim(cfg: TrainConfig, resume: bool, overwrite: bool) -> Claim:
    """Lock the run folder and the output LoRA, then check the folder's ownership. LockedError names the other
    training; RunFolderError says what to do about an old run's checkpoints or a changed config."""
    held = Claim()
    try:
        held.locks.append(run_lock(cfg.run_path()))
        held.locks.append(output_lock(cfg.output_path()))
        check_ownership(cfg, resume, overwrite)
    except BaseException:
        held.release()
        raise
    return held
