"""Validation loss: the diffusion loss at fixed noise and fixed timesteps, so checkpoints can be compared.

The training loss is a sample over random timesteps and noise: step to step it moves more with the draw than
with the model. Here every image is noised at the same TIMESTEPS timesteps, spread evenly over the schedule (the
middle of each of TIMESTEPS equal bins), with noise drawn once from a fixed seed: the same inputs at every
checkpoint, so a change of the number is a change of the model. Plain MSE against the model's target (noise or
velocity), no min-SNR weights: comparable between runs with different settings.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TIMESTEPS = 8  # per image; 8 bins of 125 steps cover SD's 1000-step schedule from nearly clean to pure noise
ROWS = 32  # noisy latents per model call: few calls (the cost is per call for small models), bounded memory
SEED = 20240  # the noise's seed: any fixed number, kept apart from the training seeds


def fixed_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> torch.Tensor:
    """The middle of each of `count` equal bins of the schedule: [count] long."""
    return ((torch.arange(count) + 0.5) * num_train_timesteps / count).long()


def fixed_noise(latents: list[torch.Tensor], count: int = TIMESTEPS, seed: int = SEED) -> list[torch.Tensor]:
    """Noise for each latent [C, h, w] at each timestep: [count, C, h, w], the same for the same shapes and seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((count,) + tuple(lat.shape), generator=gen) for lat in latents]


@torch.no_grad()
def validation_loss(predict: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
                    latents: list[torch.Tensor], noise_scheduler, noise: list[torch.Tensor] | None = None,
                    rows: int = ROWS) -> float:
    """Mean MSE over every image at every fixed timestep.

    predict(noisy [n, C, h, w], timesteps [n], image indices [n]) → the model's output, row i conditioned on
    image indices[i]'s caption; images of one size go together, up to `rows` rows a call. latents: one
    [C, h, w] per image, in the UNet's latent space; noise: fixed_noise(latents), made once and kept so that
    each call sees the same inputs."""
    noise = noise if noise is not None else fixed_noise(latents)
    count = noise[0].shape[0] if noise else TIMESTEPS
    timesteps = fixed_timesteps(noise_scheduler.config.num_train_timesteps, count)
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    by_shape: dict[tuple, list[int]] = {}
    for i, latent in enumerate(latents):
        by_shape.setdefault(tuple(latent.shape), []).append(i)
    per_call = max(1, rows // count)  # images per call
    total, n = 0.0, 0
    for group in by_shape.values():
        for start in range(0, len(group), per_call):
            chunk = group[start:start + per_call]
            clean = torch.cat([latents[i].float()[None].expand(count, *latents[i].shape) for i in chunk])
            eps = torch.cat([noise[i] for i in chunk])
            t = timesteps.repeat(len(chunk))
            noisy = noise_scheduler.add_noise(clean, eps, t)
            target = noise_scheduler.get_velocity(clean, eps, t) if v_pred else eps
            pred = predict(noisy, t, [i for i in chunk for _ in range(count)]).float().cpu()
            total += float(F.mse_loss(pred, target, reduction="sum"))
            n += target.numel()
    return total / max(n, 1)
