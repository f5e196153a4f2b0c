"""Guards between the backward pass and the optimiser step: non-finite loss or gradients, and the wall clock.

A NaN/inf step is skipped (the optimiser, the schedule and the weights are untouched) and counted; several in a
row mean the run diverged, and it stops with the likely cause named instead of training on into NaN weights
that would then be checkpointed, pruned toward and exported. Under fp16 the GradScaler already skips steps with
overflowing gradients and lowers its scale (a few are normal at the start), so there only the loss counts.
"""
from __future__ import annotations

from time import monotonic

import torch

from .checkpoint import latest_checkpoint
from .config import ConfigError, TrainConfig


class DivergedError(ConfigError):
    """Too many non-finite steps in a row; the message names the likely cause and the last good checkpoint."""


def step_is_finite(loss: torch.Tensor, params: list[torch.Tensor], check_grads: bool) -> bool:
    """The (already process-averaged) loss and, unless a GradScaler handles them, the gradients' total norm."""
    value = loss.detach().float().reshape(())
    if check_grads:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            value = value + torch.nn.utils.get_total_norm(grads).float().to(value.device)
    return bool(torch.isfinite(value))


class NonFiniteGuard:
    def __init__(self, cfg: TrainConfig, precision: str):
        self.cfg, self.precision = cfg, precision
        self.limit = cfg.training.max_nonfinite_steps
        self.lr = cfg.optimizer.learning_rate
        self.in_row = 0
        self.skipped = 0

    def record(self, finite: bool) -> None:
        if finite:
            self.in_row = 0
        else:
            self.in_row += 1
            self.skipped += 1

    def check(self) -> None:
        """DivergedError after `limit` non-finite steps in a row."""
        if self.in_row >= self.limit:
            raise DivergedError(self.message())

    def message(self) -> str:
        cause = (f"the learning rate {self.lr:g} is likely too high (try a tenth of it)" if self.precision != "fp16"
                 else f"fp16 overflowed or the learning rate {self.lr:g} is too high (try bf16 or "
                      "`training.mixed_precision = \"no\"`, or a tenth of the rate)")
        return f"training diverged: the loss or gradients were NaN/inf for {self.in_row} steps in a row; {cause}; " \
               + kept(self.cfg)


def kept(cfg: TrainConfig) -> str:
    """What of the run is safe, for messages: its newest checkpoint and how to export it."""
    last = latest_checkpoint(cfg.run_path())
    if last is None:
        return "no checkpoint was made"
    return (f"the last good checkpoint is {last} (export it: python -m trainer export {cfg.run_path()} "
            f"--out {cfg.output_path()})")


def non_finite(lora: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding NaN or ±inf."""
    return [f"{part}:{key}" for part, tensors in lora.items() for key, t in tensors.items()
            if not bool(torch.isfinite(t).all())]


def check_weights(lora: dict[str, dict[str, torch.Tensor]], cfg: TrainConfig, step: int) -> None:
    """Nothing non-finite is ever checkpointed or exported (nor are good checkpoints pruned for it)."""
    bad = non_finite(lora)
    if bad:
        raise DivergedError(f"the LoRA weights hold NaN/inf at step {step} ({len(bad)} tensors, e.g. {bad[0]}); "
                            f"nothing was saved; lower `optimizer.learning_rate`; " + kept(cfg))


class CheckpointClock:
    """A checkpoint every `minutes` of wall-clock time as well: long steps never leave hours unsaved."""

    def __init__(self, minutes: float, now: float | None = None):
        self.seconds = minutes * 60
        self.last = monotonic() if now is None else now

    def due(self, now: float | None = None) -> bool:
        now = monotonic() if now is None else now
        return self.seconds > 0 and now - self.last >= self.seconds

    def reset(self, now: float | None = None) -> None:
        self.last = monotonic() if now is None else now
