"""How far pictures are apart, measured in the VAE encoder's feature space (every SD model has one, offline).

A checkpoint is judged by three numbers, each defined here once:
- strength: how far the LoRA moves the pictures of the sample prompts from the base model's pictures (same
  prompts, same seeds). `picture_distance` per pair, averaged: 0 = unchanged, 1 = opposite features everywhere.
- leak: the same distance on prompts without the trigger word or subject. A good LoRA moves its own prompts and
  leaves the rest; a leak that grows towards the strength means the LoRA draws its subject or style everywhere.
- likeness: how close the samples' style statistics are to the training images', normalised so that the base
  model's pictures score 0 and the training images themselves 1 (`likeness`).

Why the VAE encoder: it is the one image network every SD checkpoint ships (no download, no extra model), it was
trained to keep what pictures look like, and its early layers respond to colour, edges and texture at several
scales, like the VGG layers of perceptual losses (LPIPS; Gatys et al.'s Gram-matrix style statistics).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

EPS = 1e-8


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL pictures of one size → [B, 3, H, W] in [-1, 1], the VAE's input range."""
    arrays = [np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def vae_features(encoder, images: list[Image.Image]) -> list[torch.Tensor]:
    """The output of every down block of a VAE's encoder (`vae.encoder`) and of its middle block for pictures of
    one size: [B, C_l, H_l, W_l] per layer, fp32 on the CPU."""
    assert len({im.size for im in images}) == 1, "vae_features takes pictures of one size"
    param = next(encoder.parameters())
    with torch.autocast(param.device.type, enabled=False):
        h = encoder.conv_in(to_pixels(images).to(param.device, param.dtype))
        feats = []
        for block in encoder.down_blocks:
            h = block(h)
            feats.append(h.float().cpu())
        feats.append(encoder.mid_block(h).float().cpu())
    return feats


def picture_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per picture pair, in [0, 1]: 1 − cosine similarity of the channel vectors at each position, halved, averaged
    over positions and layers (LPIPS without its learned weights). Position by position, so a changed shape counts
    as much as a changed texture; the cosine ignores a feature vector's length, so no layer's scale dominates.
    a, b: vae_features of pictures of the same size, paired by index. Returns [B]."""
    per_layer = []
    for fa, fb in zip(a, b):
        cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1, eps=EPS)  # [B, H, W]
        per_layer.append(((1 - cos) / 2).flatten(1).mean(1))
    return torch.stack(per_layer).mean(0)


def picture_stats(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each picture's style statistics per layer, [B, C + C²]: its channel means and channel covariance, pooled
    over positions (so the place of a figure does not matter, its colours and textures do; Gatys et al.'s Gram
    matrices, centred)."""
    out = []
    for layer in features:
        f = layer.flatten(2)  # [B, C, N]
        mean = f.mean(2)
        centred = f - mean[..., None]
        cov = centred @ centred.transpose(1, 2) / f.shape[2]  # [B, C, C]
        out.append(torch.cat([mean, cov.flatten(1)], 1))
    return out


def pictures_stats(encoder, images: list[Image.Image]) -> list[torch.Tensor]:
    """picture_stats of pictures of any sizes (each encoded on its own): [B, C + C²] per layer."""
    rows = [picture_stats(vae_features(encoder, [im])) for im in images]
    return [torch.cat([r[layer] for r in rows]) for layer in range(len(rows[0]))]


def style_gap(x: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Per picture pair [B]: how far x's style statistics are from the reference picture's, per layer relative to
    the reference's own size (so every layer weighs the same), averaged over layers."""
    return torch.stack([(sx - sr).norm(dim=1) / (sr.norm(dim=1) + EPS) for sx, sr in zip(x, reference)]).mean(0)


def likeness(samples: list[torch.Tensor], base: list[torch.Tensor], training: list[torch.Tensor]) -> float | None:
    """1 − gap(samples, training) / gap(base pictures, training), from picture_stats of pictures paired by index:
    sample i and base picture i drawn from training image i's caption (same seed). Paired by caption, the base's
    gap is what the LoRA has to learn (the style, the subject), not a difference of content (colours, shapes) that
    a set-wide statistic would mix in. The base model's own pictures score 0, the training images themselves 1,
    below 0 is further away than the base. None when the base already matches (nothing to learn)."""
    reach = float(style_gap(base, training).mean())
    if reach < 1e-6:
        return None
    return 1.0 - float(style_gap(samples, training).mean()) / reach
