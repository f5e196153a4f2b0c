"""What a run computes once before its first step: VAE latents (when augmentation is deterministic) and
text-encoder outputs (when the encoders are frozen and the captions fixed), so the steps skip those models."""
from __future__ import annotations

import torch

from .conditioning import encode_text, to_unet_latents
from .data import Draw, LatentCache, latent_key
from .memory import release_file_pages
from .stopping import check


def parameters(*modules) -> list[torch.Tensor]:
    return [p for m in modules if m is not None for p in m.parameters()]


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    # The distribution's mean, not a sample: cached and uncached training then see identical latents.
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    return to_unet_latents(vae, latents)


@torch.no_grad()
def cached_latents(ds, flips, cache: LatentCache, vae_identity: str, vae, device,
                   share: tuple[int, int] = (0, 1), stop=None) -> dict[tuple[int, bool], torch.Tensor]:
    """Every (image, flip) latent, from the disk cache or encoded once now; a warm cache never decodes.
    share = (k, n): only every n-th pair from the k-th, for n processes filling the cache together."""
    out = {}
    pairs = [(i, flip) for i in range(len(ds.images)) for flip in flips]
    for i, flip in pairs[share[0]::share[1]]:
        check(stop)  # encoding a large set takes minutes: a stop is honoured between images
        draw = Draw(image=i, flip=flip, caption="", crop_seed=0)  # centre crop: the seed is unused
        key = latent_key(ds.images[i], flip, ds.crop_top_left(draw), vae_identity)
        out[(i, flip)] = cache.get_or_encode(
            key, lambda: encode_latents(vae, ds.load_pixels(draw)[0][None].to(device))[0].float().cpu())
    return out


def all_latents(ds, cfg, cache_dir, base, accelerator, stop=None, drop: bool = True
                ) -> dict[tuple[int, bool], torch.Tensor]:
    """Every latent the run will draw, in host memory; the VAE's encoder is dropped afterwards (`drop`; several
    runs on one base drop it once none of them needs it: multi_run.py)."""
    vae, device = base.vae, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    cache = LatentCache(cache_dir)
    flips = (False, True) if cfg.data.flip else (False,)
    if world > 1:  # each process encodes its share into the disk cache: one process encoding a large set
        # alone kept the others waiting past NCCL's 10-minute timeout
        cached_latents(ds, flips, cache, base.identity, vae, device, share=(rank, world), stop=stop)
        accelerator.wait_for_everyone()
    latents = cached_latents(ds, flips, cache, base.identity, vae, device, stop=stop)
    if drop:
        drop_vae_encoder(vae)
    return latents


def drop_vae_encoder(vae) -> None:
    # Every latent is cached: from here on the VAE only decodes samples. Its encoder (a third of the VAE,
    # 0.14 GB for SD's in fp32) is dropped, not moved to "meta": the pipelines ask the VAE for its device,
    # which is its first parameter's, and that would then be the encoder's "meta". An encoder read from a
    # memory-mapped file keeps its pages resident while the decoder maps the same file: drop them too.
    release_file_pages(parameters(vae.encoder, getattr(vae, "quant_conv", None)))
    vae.encoder = None
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv = None


@torch.no_grad()
def text_outputs(captions, encoders, tokenizers, clip_skip: int, accelerator, stop=None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """caption → (embeddings [77, D], pooled [P] for SDXL else None), in host memory like the latents: SDXL's
    are ~0.3 MB a caption, GBs on a GPU for a big set."""
    out = {}
    with accelerator.autocast():
        for caption in sorted(set(captions)):
            check(stop)
            emb, pooled = encode_text(encoders, tokenizers, [caption], clip_skip, accelerator.device)
            out[caption] = (emb[0].cpu(), None if pooled is None else pooled[0].cpu())
    return out
