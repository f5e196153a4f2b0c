"""The LoRA network: PEFT adapters on the UNet's transformer blocks and on the text encoders' layers.

Targets are kohya's defaults so that an export covers exactly what A1111/ComfyUI expect (formats.md):
every Linear and 1x1 Conv2d inside a Transformer2DModel of the UNet (192 modules for SD 1.x/2.x, 722 for SDXL)
and q/k/v/out_proj + fc1/fc2 of every CLIP layer (72 for CLIP-L, 192 for OpenCLIP-G). All four attention
projections are always trained together: loaders skip partial sets.

With network.conv_rank > 0 (kohya's conv_dim, "LoCon") the UNet's ResNet blocks and down/upsamplers are adapted
too, as kohya does: their 3x3 convolutions at conv_rank / conv_alpha, their Linear and 1x1 convolutions
(time_emb_proj, conv_shortcut) at rank / alpha. Convolutions paint texture and fine detail, which the attention
layers reach only through the blocks around them, so a style learns faster; opt-in, because older loaders drop
3x3 entries (formats.md).
"""
from __future__ import annotations

import re
import warnings

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .config import NetworkConfig
from .errors import StudioError

ADAPTER = "default"
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# PEFT's names for the init schemes of lora_A (lora_B always starts at zero, so training starts at the base model).
_INIT = {"gaussian": "gaussian", "kaiming": True, "zeros": False}


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself: an earlier adapter (another run on the same base) wraps it in a PEFT LoRA layer."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _layers(model: torch.nn.Module):
    """(name, layer) of every module, a PEFT LoRA layer as its base layer and without its own parts."""
    inside = None  # a LoRA layer's prefix: its parts (base_layer, lora_A.<name>…) come right after it
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside = f"{name}."
        yield name, base_layer(module)


CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)  # kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3


def _is_3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def unet_target_names(unet: torch.nn.Module, conv: bool = False) -> list[str]:
    """Full module paths of every Linear / 1x1 Conv2d inside a Transformer2DModel; with `conv`, also every Linear
    and Conv2d inside a ResNet block or a down/upsampler (LoCon)."""
    names = []
    for block_name, block in unet.named_modules():
        in_conv_block = conv and isinstance(block, CONV_BLOCKS)
        if not (isinstance(block, Transformer2DModel) or in_conv_block):
            continue
        for name, module in _layers(block):
            is_1x1 = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
            if isinstance(module, torch.nn.Linear) or is_1x1 or (in_conv_block and _is_3x3(module)):
                names.append(f"{block_name}.{name}")
    return names


def conv_target_names(unet: torch.nn.Module, names: list[str]) -> list[str]:
    """Those of `names` that are 3x3 (or larger) convolutions: the modules at network.conv_rank."""
    return [n for n in names if _is_3x3(base_layer(unet.get_submodule(n)))]


def text_target_names(text_encoder: torch.nn.Module) -> list[str]:
    return [name for name, module in _layers(text_encoder)
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_TARGETS
            and ".layers." in name]


def lora_config(net: NetworkConfig, targets: list[str], conv_targets: list[str] = ()) -> LoraConfig:
    """`conv_targets` (a subset of `targets`) get network.conv_rank / conv_alpha instead of rank / alpha."""
    # Full paths as targets: PEFT matches by suffix, and a full path matches exactly one module. The patterns are
    # regular expressions matched at the end of a module's path: escaped, a path matches only itself.
    conv = [re.escape(n) for n in conv_targets]
    return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, target_modules=targets,
                      init_lora_weights=_INIT[net.init_weights],
                      rank_pattern={n: net.conv_rank for n in conv}, alpha_pattern={n: net.conv_alpha for n in conv})


def add_lora(unet, text_encoders: list, net: NetworkConfig, adapter: str = ADAPTER) -> None:
    """Inject trainable LoRA adapters; the base weights stay frozen. Text encoders only when trained. `adapter`:
    its name, another one for each of several runs on one base (multi_run.py); it is the active one afterwards."""
    unet.requires_grad_(False)
    with warnings.catch_warnings():  # PEFT warns of a second adapter on a model: several runs mean to (multi_run.py)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        targets = unet_target_names(unet, conv=net.conv_rank > 0)
        unet.add_adapter(lora_config(net, targets, conv_target_names(unet, targets)), adapter_name=adapter)
        for te in text_encoders:
            te.requires_grad_(False)
            if net.train_text_encoder:
                te.add_adapter(lora_config(net, text_target_names(te)), adapter_name=adapter)
    use_adapter([unet, *text_encoders], adapter)
    # LoRA parameters train in fp32 even when the frozen base is fp16/bf16: their updates are tiny.
    for model in [unet, *text_encoders]:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)


def use_adapter(models: list, adapter: str) -> None:
    """Make `adapter` the one active adapter wherever it exists; layers without it run with adapters off (a text
    encoder another run trains). Several runs on one base switch with this before each of their steps."""
    for model in models:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                if adapter in layer.lora_A:
                    layer.enable_adapters(True)
                    layer.set_adapter(adapter)
                else:
                    layer.enable_adapters(False)


def active_adapter(model: torch.nn.Module) -> str:
    """The adapter `model`'s LoRA layers run (ADAPTER for a model without any)."""
    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer.active_adapters[0] if layer is not None and layer.active_adapters else ADAPTER


def lora_parameters(model: torch.nn.Module, adapter: str | None = None) -> list[torch.nn.Parameter]:
    """The parameters of one adapter (default: the active one): a model may carry several runs' adapters."""
    tag = f".{adapter or active_adapter(model)}."
    return [p for n, p in model.named_parameters() if "lora_" in n and tag in n]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-style state of the active adapter: `<module path>.lora_A.weight` / `.lora_B.weight`, fp32, on the CPU
    (the adapter's name is not part of the keys, so every adapter exports alike)."""
    # save_embedding_layers=False: otherwise PEFT looks the model's name up on the hub to see if embeddings changed.
    state = get_peft_model_state_dict(model, adapter_name=active_adapter(model), save_embedding_layers=False)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Into the active adapter."""
    result = set_peft_model_state_dict(model, state, adapter_name=active_adapter(model))
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise StudioError(f"the checkpoint holds LoRA keys this model does not have (e.g. {unexpected[:3]}): resume with "
                          "the network settings the run started with")
