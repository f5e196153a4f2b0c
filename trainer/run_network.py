"""A run's trained network on its base model: the LoRA adapters (network.py), the training forwards (lean.py,
cpu_attention.py), gradient checkpointing and the modules' train/eval modes."""
from __future__ import annotations

import torch

from . import preflight
from .config import TrainConfig
from .cpu_attention import use_cpu_training_attention
from .export_run import part_names
from .lean import lean_forwards
from .models import BaseModel
from .network import ADAPTER, add_lora


def add_network(cfg: TrainConfig, base: BaseModel, device: torch.device, adapter: str = ADAPTER
                ) -> dict[str, torch.nn.Module]:
    """LoRA adapters on the UNet and (optionally) the text encoders; returns the trained modules by name."""
    tr, net, unet, encoders = cfg.training, cfg.network, base.unet, base.text_encoders
    preflight.check_ranks(net, unet, encoders if net.train_text_encoder else [])
    torch.manual_seed(tr.seed)  # the same LoRA init on every process and in every run with this seed
    add_lora(unet, encoders, net, adapter)
    lean_forwards(unet)  # fewer activations kept for backward, same results (lean.py)
    if device.type == "cpu":
        use_cpu_training_attention(unet, tr.attention_memory_mb)  # bf16 attention without recomputation
    parts = {"unet": unet}
    if net.train_text_encoder:
        parts.update(zip(part_names(len(encoders)), encoders))
    if tr.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in list(parts.values())[1:]:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for te in encoders:
        te.train(net.train_text_encoder)  # frozen encoders stay in eval mode (no dropout)
    unet.train()
    return parts
