"""Which precision a run trains in, and the accelerate `Accelerator` for it.

"auto" is bf16 where the hardware computes in it (recent CUDA GPUs; CPUs with AVX512-BF16 or AMX), else fp16 on
CUDA, else fp32. The base model's weights are cast to it; the LoRA weights stay fp32 (loop.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from .config import ConfigError


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "fp16" and device.type == "cpu":
        raise ConfigError("`training.mixed_precision` = \"fp16\" needs a CUDA GPU; on the CPU use \"bf16\" or \"no\"")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        # Only bf16 the GPU computes natively (Ampere and later): torch's default also counts emulation, which on
        # a T4 / RTX 20xx / V100 runs without tensor cores and without SDPA's flash kernels, several times slower.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def make_accelerator(precision: str, cpu: bool, unused_parameters: bool = False) -> Accelerator:
    """unused_parameters: some trained parameters get no gradient in a step (a text encoder's last layers when
    conditioning on an earlier one: clip_skip, SDXL's first encoder); DDP must then look for them every step."""
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_parameters else []
    try:
        return Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers)
    except ValueError as e:
        # accelerate keeps one precision per process; a notebook or script that trains twice with another
        # `training.mixed_precision` lands here (the UI and CLI start a process per training, so never do).
        if "already been initialized" not in str(e):
            raise
        raise ConfigError(f"`training.mixed_precision` = \"{precision}\": this Python process already trained with "
                          "another precision, and accelerate fixes it per process. Use the same mixed_precision "
                          "in every run of one process, or start each training in its own process "
                          "(python -m trainer train --config ...)") from e
