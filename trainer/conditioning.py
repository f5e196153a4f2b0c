"""Conditioning: text embeddings, SDXL's size/crop time ids and the VAE↔UNet latent scaling, the same code for
training and for sampling.

SD 1.x/2.x condition on the last hidden state of the one CLIP encoder (or layer -clip_skip, re-normalised).
SDXL concatenates the penultimate hidden states of both encoders ([B, 77, 768 + 1280]) and adds the pooled,
projected output of the second ([B, 1280]) plus six time ids per image.
"""
from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    # Captions over 75 tokens are cut here; the dataset report warns about them by file name.
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _final_norm(text_encoder) -> torch.nn.Module:
    text_encoder = getattr(text_encoder, "module", text_encoder)  # a trained encoder under several processes is DDP's
    # transformers 5 dropped the `text_model` level from CLIPTextModel but kept it in CLIPTextModelWithProjection.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def text_parts(pipe) -> tuple[list, list]:
    """A diffusers pipeline's text encoders and tokenizers, in encode_text's order (SDXL's two, else one)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    return [pipe.text_encoder], [pipe.tokenizer]


def encode_text(text_encoders: list, tokenizers: list, captions: list[str], clip_skip: int = 1,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions → (prompt_embeds [B, 77, D], pooled [B, P] for SDXL else None)."""
    device = device or text_encoders[0].device
    if len(text_encoders) == 1:
        (te,), (tok,) = text_encoders, tokenizers
        out = te(tokenize(tok, captions).to(device), output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            return _final_norm(te)(out.hidden_states[-clip_skip]), None
        return out.last_hidden_state, None
    hidden, pooled = [], None
    for te, tok in zip(text_encoders, tokenizers):
        out = te(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])  # SDXL: penultimate layer, no final norm
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]],
                  target_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Per image: (orig h, orig w, crop top, crop left, target h, target w); sizes arrive as (w, h)."""
    rows = [[oh, ow, top, left, th, tw]
            for (ow, oh), (top, left), (tw, th) in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32)


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(mean, std) of the VAE's latents as its config gives them: per channel for VAEs that publish them (some
    SDXL ones), else (shift_factor or 0, 1)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        return (torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like))
    return getattr(vae.config, "shift_factor", None) or 0.0, 1.0


def to_unet_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents → the space the UNet works in (training); from_unet_latents is its inverse (decoding)."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) * vae.config.scaling_factor / std


def from_unet_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _latent_stats(vae, latents)
    return latents * std / vae.config.scaling_factor + mean
