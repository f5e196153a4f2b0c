"""How far pictures are apart, measured in the VAE encoder's feature space (every SD model has one, offline).

A checkpoint is judged by three numbers, each defined here once:
- strength: how far the LoRA moves the pictures of the sample prompts from the base model's pictures (same
  prompts, same seeds). `picture_distance` per pair, averaged: 0 = unchanged, 1 = opposite features everywhere.
- leak: the same distance on prompts without the trigger word or subject. A good LoRA moves its own prompts and
  leaves the rest; a leak that grows towards the strength means the LoRA draws its subject or style everywhere.
- likeness: how close the model comes to its training images when it redraws them (img2img at REDRAW_STRENGTH),
  normalised so that the base model's redraws score 0 and the training images themselves 1 (`likeness`).

Why the VAE encoder: it is the one image network every SD checkpoint ships (no download, no extra model), it was
trained to keep what pictures look like, and its early layers respond to colour, edges and texture at several
scales, like the VGG layers of perceptual losses (LPIPS).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

EPS = 1e-8
# How far a training picture is noised before the model redraws it (likeness): at 0.6 of the schedule the layout
# survives (the figure stays where it stood, so redraw and picture compare position by position) while fill, colour
# and texture are drawn anew: the base model redraws the demo's striped figures plain, a LoRA that learnt the
# stripes redraws them striped.
REDRAW_STRENGTH = 0.6


def redraw_steps(steps: int) -> int:
    """Denoising steps of a redraw in an evaluation of `steps` steps: the part of that schedule below
    REDRAW_STRENGTH, rounded up (as img2img's denoising strength counts them), so a redraw's steps are as large as
    the pictures' drawn from noise. 4 at the default 6: a redraw starts from a picture that has its layout, and at
    4 steps the demo checkpoints ranked as at 6 (stop 28), for a third less evaluation time."""
    return math.ceil(steps * REDRAW_STRENGTH)


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


def each_features(encoder, images: list[Image.Image]) -> list[list[torch.Tensor]]:
    """vae_features of pictures of any sizes, each encoded on its own: one [1, C_l, H_l, W_l] list per picture."""
    return [vae_features(encoder, [im]) for im in images]


def likeness(redrawn: list[list[torch.Tensor]], base_redrawn: list[list[torch.Tensor]],
             training: list[list[torch.Tensor]]) -> float | None:
    """1 − distance(redrawn, training) / distance(base model's redrawn, training): how much closer the model's
    redraws of its training pictures come to those pictures than the base model's do, from each_features of
    pictures paired by index (training picture i, the model's and the base's redraw of it: same noise, same
    caption). The base model's redraws score 0, the training pictures themselves 1 (a redraw that gives the picture
    back), below 0 is further away than the base. None when the base already redraws them exactly, or when a
    redraw is not finite.

    Why redraws (img2img from the training picture at REDRAW_STRENGTH), not pictures drawn from noise: a redraw
    keeps the picture's layout (where the figure stands, how large), so the two pictures can be compared position
    by position, and what differs is what the model draws into that layout: fill, texture, colour, the subject's
    look, which is what a LoRA learns. Pictures drawn from noise differ in layout from their training picture, and
    a LoRA changes how the sampler lays a picture out; stop 27 measured that statistics pooled over positions
    (channel means and covariances) then followed the background tint and the figure's size, and ranked a 4×-long
    style run's broken early checkpoints above its good late ones. Redraws rank them as the truth does (stop 28,
    scripts/prove_recommendation.py)."""
    def mean_distance(pictures):
        return float(np.mean([float(picture_distance(a, b).mean()) for a, b in zip(pictures, training, strict=True)]))

    reach = mean_distance(base_redrawn)
    if not reach >= 1e-6:  # also NaN
        return None
    value = 1.0 - mean_distance(redrawn) / reach
    return value if math.isfinite(value) else None  # NaN pictures: nothing measured (events stay valid JSON)
