"""Tiny Stable Diffusion models with the real topology and tiny widths, built in code for CPU tests.

Module names (so LoRA key names) depend only on topology: these produce the real key sets of SD 1.x, SD 2.x
and SDXL (192/72, 192/92, 722/72/192 LoRA modules) in a few MB. Nothing is downloaded: the tokenizer is the
real CLIP tokenizer shipped in trainer/tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "trainer" / "tokenizer"
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def text_config(layers: int, hidden: int = 32, act: str = "quick_gelu", projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                          hidden_act=act, projection_dim=projection_dim, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407 if act == "quick_gelu" else 0)


def tiny_vae() -> AutoencoderKL:
    # 4 levels like the real VAE (8× downsampling), 32 channels each.
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                         norm_num_groups=32, sample_size=64)


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1,
                         clip_sample=False)


def sd1(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=2, down_block_types=SD_DOWN, up_block_types=SD_UP,
                                norm_num_groups=32, sample_size=8)
    return dict(unet=unet, vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(12)),
                tokenizer=tokenizer(), scheduler=scheduler("epsilon"))


def sd2v(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
                                upcast_attention=True, down_block_types=SD_DOWN, up_block_types=SD_UP,
                                norm_num_groups=32, sample_size=12)
    te = CLIPTextModel(text_config(23, act="gelu"))
    return dict(unet=unet, vae=tiny_vae(), text_encoder=te, tokenizer=tokenizer("!"),
                scheduler=scheduler("v_prediction"))


def sdxl(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 4), cross_attention_dim=64, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=32, sample_size=16)
    te1 = CLIPTextModel(text_config(12))
    te2 = CLIPTextModelWithProjection(text_config(32, act="gelu"))
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)
    return dict(unet=unet, vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer(),
                tokenizer_2=tokenizer("!"), scheduler=sched)


BUILDERS = {"sd1": sd1, "sd2-v": sd2v, "sdxl": sdxl}


def pipeline(family: str, seed: int = 0):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = BUILDERS[family](seed)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_diffusers(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model as a diffusers folder (model_index.json + subfolders)."""
    pipeline(family, seed).save_pretrained(str(path))
    return Path(path)


def lora_pipeline(family: str, rank: int = 4, alpha: float = 2.0, seed: int = 0, conv_rank: int = 0,
                  conv_alpha: float = 1.0):
    """A tiny pipeline with LoRA adapters whose up weights are non-zero, as after training; `conv_rank`: LoCon."""
    from trainer.config import TrainConfig
    from trainer.network import add_lora

    pipe = pipeline(family)
    cfg = TrainConfig()
    cfg.network.rank, cfg.network.alpha = rank, alpha
    cfg.network.conv_rank, cfg.network.conv_alpha = conv_rank, conv_alpha
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    add_lora(pipe.unet, encoders, cfg.network)
    gen = torch.Generator().manual_seed(seed)
    for model in [pipe.unet, *encoders]:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
    return pipe, encoders, cfg


def export_kohya(pipe, encoders, cfg, path, dtype=torch.float16, family="sd1"):
    """Write the pipeline's adapters as a kohya file, the way the trainer's export does."""
    from trainer.lora_file import save_lora, text_encoder_prefixes, to_kohya
    from trainer.metadata import RunInfo, build_metadata
    from trainer.network import lora_state

    prefixes = text_encoder_prefixes(len(encoders))
    parts = {"lora_unet_": lora_state(pipe.unet), **{p: lora_state(te) for p, te in zip(prefixes, encoders)}}
    version, arch = (("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora") if family == "sdxl"
                     else ("sd_v1", "stable-diffusion-v1/lora"))
    info = RunInfo(version, arch, "epsilon", "tiny", 10, 1, 3, 0.0, "no", "AdamW",
                   {"10_shapes": {"red": 2}}, {"10_shapes": {"n_repeats": 10, "img_count": 3}}, {})
    tensors = to_kohya(parts, cfg.network.alpha, dtype, cfg.network.conv_alpha)
    return save_lora(path, tensors, build_metadata(cfg, info, Path(path).stem))
