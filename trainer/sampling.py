"""Sample images during training: the run's own modules in a pipeline, one PNG per sample prompt.

The sample prompts are encoded up front when the text encoders are frozen and cached (encode_samples), so the
encoders can be freed before the first step: a UNet-only run holds no CLIP weights while it steps.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .caches import parameters
from .generate import GenerationCancelled, encode_prompt, make_pipeline, render_embeds
from .memory import release_file_pages, trim_heap


@torch.no_grad()
def encode_samples(prompts: list[str], cfg, encoders, tokenizers, accelerator) -> list[dict[str, torch.Tensor]]:
    with accelerator.autocast():
        return [encode_prompt(encoders, tokenizers, p, cfg.sample.negative_prompt, cfg.model.clip_skip)
                for p in prompts]


def render_samples(out_dir: Path, tag: str, cfg, base, prompts: list[str], embeds: list[dict], trained: list,
                   accelerator, stop=None) -> list[str]:
    """PNG paths `out_dir/<tag>_<i>.png`, one per prompt; `embeds` empty: the encoders are live, encode now.
    A stop (SIGTERM, Stop) ends them within one denoising step: the paths made so far."""
    trim_heap()  # the steps' freed activations, kept for the next step, need not sit under the decoder too
    width = cfg.sample.width or cfg.data.resolution
    height = cfg.sample.height or cfg.data.resolution
    encoders, tokenizers, vae = base.text_encoders, base.tokenizers, base.vae
    live_encoders = [None] * len(encoders) if embeds else encoders  # None: freed, embeddings ready
    pipe = make_pipeline(base.unet, vae, live_encoders, tokenizers, base.noise_scheduler, "euler")
    pipe.set_progress_bar_config(disable=True)
    for m in trained:
        m.eval()
    paths = []
    stopped = (lambda *_: stop.flag) if stop is not None else None  # checked after every denoising step
    with accelerator.autocast():
        for i, prompt in enumerate(prompts):
            prompt_embeds = embeds[i] if embeds else encode_prompt(
                encoders, tokenizers, prompt, cfg.sample.negative_prompt, cfg.model.clip_skip)
            try:
                image = render_embeds(pipe, prompt_embeds, cfg.sample.seed + i, cfg.sample.steps, cfg.sample.cfg,
                                      width, height, progress=stopped)
            except GenerationCancelled:
                break
            path = out_dir / f"{tag}_{i}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(str(path))
    for m in trained:
        m.train()
    # A memory-mapped decoder's pages would stay resident through the steps; the next sample re-reads them.
    release_file_pages(parameters(vae.decoder, getattr(vae, "post_quant_conv", None)))
    return paths
