"""A cheap live preview of a generation's latents: a linear map from latent channels to RGB, no decoder pass.

The map is fitted once per VAE rather than shipped as constants per family: the VAE encodes a picture of flat
colour blocks, and least squares finds the 4→3 (SDXL, SD 1.x/2.x and the demo model alike) projection that
turns each latent cell back into its block's colour. This works for any VAE the app loads, costs one small
encode, and needs no extra model.
"""
from __future__ import annotations

import torch
from PIL import Image

from .conditioning import to_unet_latents

BLOCKS = 12  # colour blocks per side of the fitting picture
CELLS_PER_BLOCK = 2  # latent cells per block side: the middle of a block is free of its neighbours' colours


def _scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def fit_projection(vae) -> torch.Tensor:
    """[C + 1, 3]: latent channels (UNet space) and a bias → RGB in [0, 1]."""
    f = _scale_factor(vae)
    colours = torch.rand(3, BLOCKS, BLOCKS, generator=torch.Generator().manual_seed(0))
    px = f * CELLS_PER_BLOCK
    picture = colours.repeat_interleave(px, 1).repeat_interleave(px, 2)[None]  # [1, 3, H, W]
    param = next(vae.parameters())
    encoded = vae.encode((picture * 2 - 1).to(param.device, param.dtype)).latent_dist.mean
    latents = to_unet_latents(vae, encoded.float().cpu())[0]  # [C, h, w]
    target = colours.repeat_interleave(CELLS_PER_BLOCK, 1).repeat_interleave(CELLS_PER_BLOCK, 2)
    x = torch.cat([latents.flatten(1), torch.ones(1, latents[0].numel())]).T  # [cells, C + 1]
    y = target.flatten(1).T  # [cells, 3]
    return torch.linalg.lstsq(x.double(), y.double()).solution.float()


def latent_preview(latents: torch.Tensor, projection: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """The first picture of a batch of UNet-space latents [B, C, h, w] as an RGB image (resized to `size`)."""
    lat = latents[0].detach().float().cpu()  # [C, h, w]
    rgb = torch.einsum("chw,cr->rhw", lat, projection[:-1]) + projection[-1].view(3, 1, 1)
    array = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array, "RGB")
    return image.resize(size, Image.BILINEAR) if size else image
