"""Where a diffusers module's weight lives in a single-file checkpoint of the original (LDM / SGM) layout.

`weight_views(state, family, config_dir)` maps (part, module path) → a tensor that *is* that weight inside `state`
(a view sharing its memory), so adding a delta to it patches the checkpoint in place, keeping every key, shape and
dtype. The UNet's map comes from diffusers' own conversion (convert_ldm_unet_checkpoint renames without copying:
each converted tensor shares the original's storage, checked here). The text encoders are mapped from the layouts:
- OpenAI CLIP (SD 1.x `cond_stage_model.transformer.`, SDXL's first `conditioner.embedders.0.transformer.`): the
  transformers module tree, with or without the `text_model.` level (older checkpoints lack it);
- OpenCLIP (SD 2.x `cond_stage_model.model.`, SDXL's second `conditioner.embedders.1.model.`):
  `transformer.resblocks.{i}.attn.in_proj_weight` holds q, k, v stacked by rows; out_proj, mlp.c_fc (fc1) and
  mlp.c_proj (fc2) keep their own weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
OPEN_CLIP_NAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _unet_views(state: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    converted = sfu.convert_ldm_unet_checkpoint(state, unet_config)
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    views = {}
    for key, t in converted.items():
        if key.endswith(".weight"):
            # a copy would silently drop the patch: this diffusers version would need another route
            assert t.untyped_storage().data_ptr() in storages, f"{key} is not a view of the checkpoint"
            views[key[: -len(".weight")]] = t
    return views


def _clip_views(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    views = {}
    for key, t in state.items():
        if key.startswith(prefix) and key.endswith(".weight"):
            path = key[len(prefix): -len(".weight")].removeprefix("text_model.")
            views[path] = views["text_model." + path] = t  # the module path with and without the old level
    return views


def _open_clip_views(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    views = {}
    for key, t in state.items():
        found = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)[._]weight$", key)
        if not found:
            continue
        i, rest = found.groups()
        layer = f"encoder.layers.{i}"
        if rest == "attn.in_proj":  # `attn.in_proj_weight`: no module of its own in OpenCLIP
            width = t.shape[0] // 3
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                views[f"{layer}.self_attn.{name}"] = t[j * width:(j + 1) * width]  # row slices: views
        for ours, theirs in OPEN_CLIP_NAMES.items():
            if rest == theirs:
                views[f"{layer}.{ours}"] = t
    return {**views, **{"text_model." + k: v for k, v in views.items()}}


def weight_views(state: dict[str, torch.Tensor], arch: str, unet_config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{part: {module path: weight view}} for a family's layout (arch: "sd1" | "sd2" | "sdxl")."""
    parts = {"unet": _unet_views(state, unet_config)}
    if arch == "sd1":
        parts["text_encoder"] = _clip_views(state, CLIP_PREFIX["sd1"])
    elif arch == "sd2":
        parts["text_encoder"] = _open_clip_views(state, OPEN_CLIP_PREFIX["sd2"])
    else:
        parts["text_encoder"] = _clip_views(state, CLIP_PREFIX["sdxl"])
        parts["text_encoder_2"] = _open_clip_views(state, OPEN_CLIP_PREFIX["sdxl"])
    return parts


def unet_config(config_dir: Path) -> dict:
    from diffusers import UNet2DConditionModel

    return dict(UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True))
