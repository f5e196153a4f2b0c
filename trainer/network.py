"""The LoRA network: PEFT adapters on the UNet's transformer blocks and on the text encoders' layers.

Targets are kohya's defaults so that an export covers exactly what A1111/ComfyUI expect (formats.md):
every Linear and 1x1 Conv2d inside a Transformer2DModel of the UNet (192 modules for SD 1.x/2.x, 722 for SDXL)
and q/k/v/out_proj + fc1/fc2 of every CLIP layer (72 for CLIP-L, 192 for OpenCLIP-G). All four attention
projections are always trained together: loaders skip partial sets.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .config import NetworkConfig
from .errors import StudioError

ADAPTER = "default"
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# PEFT's names for the init schemes of lora_A (lora_B always starts at zero, so training starts at the base model).
_INIT = {"gaussian": "gaussian", "kaiming": True, "zeros": False}


def unet_target_names(unet: torch.nn.Module) -> list[str]:
    """Full module paths of every Linear / 1x1 Conv2d inside a Transformer2DModel."""
    names = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for name, module in block.named_modules():
            is_1x1 = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
            if isinstance(module, torch.nn.Linear) or is_1x1:
                names.append(f"{block_name}.{name}")
    return names


def text_target_names(text_encoder: torch.nn.Module) -> list[str]:
    return [name for name, module in text_encoder.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_TARGETS
            and ".layers." in name]


def lora_config(net: NetworkConfig, targets: list[str]) -> LoraConfig:
    # Full paths as targets: PEFT matches by suffix, and a full path matches exactly one module.
    return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, target_modules=targets,
                      init_lora_weights=_INIT[net.init_weights])


def add_lora(unet, text_encoders: list, net: NetworkConfig) -> None:
    """Inject trainable LoRA adapters; the base weights stay frozen. Text encoders only when trained."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(net, unet_target_names(unet)), adapter_name=ADAPTER)
    for te in text_encoders:
        te.requires_grad_(False)
        if net.train_text_encoder:
            te.add_adapter(lora_config(net, text_target_names(te)), adapter_name=ADAPTER)
    # LoRA parameters train in fp32 even when the frozen base is fp16/bf16: their updates are tiny.
    for model in [unet, *text_encoders]:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-style state of one model: `<module path>.lora_A.weight` / `.lora_B.weight`, fp32, on the CPU."""
    # save_embedding_layers=False: otherwise PEFT looks the model's name up on the hub to see if embeddings changed.
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise StudioError(f"the checkpoint holds LoRA keys this model does not have (e.g. {unexpected[:3]}): resume with "
                          "the network settings the run started with")
