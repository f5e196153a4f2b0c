"""Optimisers and learning-rate schedules. Optional heavy imports happen only when the choice needs them."""
from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from .config import ConfigError, OptimizerConfig


def make_optimizer(opt: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """groups: [{"params": [...], "lr": x}, ...] — the UNet and text-encoder groups carry their own rates."""
    groups = [g for g in groups if g["params"]]
    if opt.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opt.learning_rate, weight_decay=opt.weight_decay)
    if opt.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("`optimizer.optimizer` = \"adamw8bit\" needs bitsandbytes: pip install bitsandbytes, "
                              "or choose \"adamw\"") from e
        # 8-bit state quarters the optimiser memory; bitsandbytes >= 0.45 runs it on the CPU too.
        return bnb.optim.AdamW8bit(groups, lr=opt.learning_rate, weight_decay=opt.weight_decay)
    if opt.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ConfigError("`optimizer.optimizer` = \"prodigy\" needs prodigyopt: pip install prodigyopt") from e
        # Prodigy estimates the step size itself; lr is a multiplier on that estimate (1.0 is the norm).
        return Prodigy(groups, lr=opt.learning_rate, weight_decay=opt.weight_decay, safeguard_warmup=True,
                       use_bias_correction=True)
    raise ConfigError(f"unknown optimizer {opt.optimizer!r}")


def make_scheduler(opt: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return get_scheduler(opt.scheduler, optimizer, num_warmup_steps=opt.warmup_steps,
                         num_training_steps=total_steps)
