"""The safetensors metadata of an exported LoRA: kohya's ss_* keys and ModelSpec 1.0.1 (formats.md).

Every value is a string (safetensors raises otherwise). A1111 reads ss_output_name as the alias, hides SDXL LoRAs
without ss_base_model_version, and draws its tag cloud from ss_tag_frequency.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import TrainConfig


@dataclass
class RunInfo:
    """What the training run knows at export time."""
    family_version: str  # ss_base_model_version: sd_v1 | sd_v2 | sdxl_base_v1-0
    architecture: str  # modelspec.architecture, e.g. stable-diffusion-v1/lora
    prediction_type: str  # epsilon | v_prediction
    base_model_name: str
    steps: int
    epoch: int
    num_images: int
    started_at: float
    mixed_precision: str
    optimizer: str
    tag_frequency: dict = field(default_factory=dict)
    dataset_dirs: dict = field(default_factory=dict)
    bucket_info: dict = field(default_factory=dict)
    thumbnail: str = ""  # data URL of a sample image


def network_args(net) -> dict:
    """What besides rank/alpha shaped the network; LoCon's as kohya's --network_args records them (strings)."""
    args: dict = {"dropout": net.dropout} if net.dropout else {}
    if net.conv_rank:
        args.update(conv_dim=str(net.conv_rank), conv_alpha=str(net.conv_alpha))
    return args


def build_metadata(cfg: TrainConfig, info: RunInfo, stem: str) -> dict[str, str]:
    net, opt, tr = cfg.network, cfg.optimizer, cfg.training
    is_sdxl = info.family_version.startswith("sdxl")
    resolution = f"{cfg.data.resolution}x{cfg.data.resolution}"
    meta = {
        # Kept by kohya even with --no_metadata: loaders depend on these.
        "ss_v2": str(info.family_version == "sd_v2"),
        "ss_base_model_version": info.family_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(net.alpha),
        "ss_network_args": json.dumps(network_args(net)),
        # Read by A1111's extra-networks page.
        "ss_output_name": stem,
        "ss_sd_model_name": info.base_model_name,
        "ss_clip_skip": str(cfg.model.clip_skip) if not is_sdxl else "None",
        "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_tag_frequency": json.dumps(info.tag_frequency),
        "ss_dataset_dirs": json.dumps(info.dataset_dirs),
        "ss_bucket_info": json.dumps(info.bucket_info),
        # Run info.
        "ss_learning_rate": str(opt.learning_rate),
        "ss_unet_lr": str(opt.unet_lr or opt.learning_rate),
        "ss_text_encoder_lr": str((opt.text_encoder_lr or opt.learning_rate) if net.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_optimizer": info.optimizer,
        "ss_lr_scheduler": opt.scheduler,
        "ss_lr_warmup_steps": str(opt.warmup_steps),
        "ss_max_grad_norm": str(opt.max_grad_norm),
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epoch),
        "ss_num_train_images": str(info.num_images),
        "ss_batch_size_per_device": str(tr.batch_size),
        "ss_gradient_accumulation_steps": str(tr.grad_accum),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": str(cfg.data.bucket_range()[0]),
        "ss_max_bucket_reso": str(cfg.data.bucket_range()[1]),
        "ss_seed": str(tr.seed),
        "ss_mixed_precision": info.mixed_precision,
        "ss_gradient_checkpointing": str(tr.gradient_checkpointing),
        "ss_min_snr_gamma": str(tr.min_snr_gamma or None),
        "ss_noise_offset": str(tr.noise_offset or None),
        "ss_caption_dropout_rate": str(cfg.data.caption_dropout),
        "ss_shuffle_caption": str(cfg.data.shuffle_tags),
        "ss_keep_tokens": str(cfg.data.keep_tokens),
        "ss_flip_aug": str(cfg.data.flip),
        "ss_training_comment": cfg.output.comment,
        # ModelSpec 1.0.1.
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": info.architecture,
        "modelspec.implementation": "diffusers",  # module names follow diffusers, as the kohya keys do
        "modelspec.title": stem,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": info.prediction_type,
    }
    if cfg.data.trigger_word:
        meta["modelspec.trigger_phrase"] = cfg.data.trigger_word
    if cfg.output.comment:
        meta["modelspec.description"] = cfg.output.comment
    if info.thumbnail:
        meta["modelspec.thumbnail"] = info.thumbnail
    return meta


def base_model_name(path: str | Path) -> str:
    path = Path(path)
    return path.stem if path.is_file() else path.name
