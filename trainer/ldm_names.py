"""The original (LDM / "SGM") names of a diffusers UNet's modules: `down_blocks.1.attentions.0` ↔ `input_blocks.4.1`.

kohya's SDXL LoRAs name UNet modules the LDM way (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
because sd-scripts' SDXL UNet is the original implementation. The numbering follows from the UNet's config:
input block 0 is conv_in, then each down block gives layers_per_block (resnet, attention) pairs and, but for the
last, a downsampler; the middle block is resnet, attention, resnet; each up block gives layers_per_block + 1
(resnet, attention) pairs, the upsampler after the last pair's attention (or resnet, in a block without one).
"""
from __future__ import annotations

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet_rest(rest: str | None) -> str | None:
    if not rest:
        return ""
    head, _, tail = rest.partition(".")
    if head not in RESNET:
        return None
    return "." + RESNET[head] + (f".{tail}" if tail else "")


def ldm_name(path: str, config) -> str | None:
    """The LDM name of the diffusers UNet module `path`, or None for modules without one."""
    if path in FIXED:
        return FIXED[path]
    layers = config.layers_per_block
    if not isinstance(layers, int):
        return None  # per-block counts: not an SD 1.x/2.x/SDXL UNet
    m = MID.match(path)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        index = 1 if kind == "attentions" else 2 * i
        tail = _resnet_rest(rest) if kind == "resnets" else (f".{rest}" if rest else "")
        return None if tail is None else f"middle_block.{index}{tail}"
    m = BLOCK.match(path)
    if not m:
        return None
    blocks, b, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if kind in ("downsamplers", "upsamplers"):
        if rest != "conv" or i != 0:
            return None
        if blocks == "down_blocks":
            return f"input_blocks.{(b + 1) * (layers + 1)}.0.op"
        has_attention = "CrossAttn" in config.up_block_types[b]
        return f"output_blocks.{b * (layers + 1) + layers}.{2 if has_attention else 1}.conv"
    tail = _resnet_rest(rest) if kind == "resnets" else (f".{rest}" if rest else "")
    if tail is None:
        return None
    sub = 0 if kind == "resnets" else 1
    if blocks == "down_blocks":
        return f"input_blocks.{1 + b * (layers + 1) + i}.{sub}{tail}"
    return f"output_blocks.{b * (layers + 1) + i}.{sub}{tail}"
