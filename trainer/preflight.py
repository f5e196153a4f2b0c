"""Checks before anything big is allocated or trained: a run that cannot finish is refused in seconds, not after
hours (an unwritable output folder, too little disk for its checkpoints, a LoRA rank wider than the layers it
adapts, a resolution or batch the memory cannot hold, a clip_skip past the text encoder's depth).

The memory estimate is deliberately a lower bound (about half of what SD 1.5 measures: 1262 MB of activations for
one 512 px sample, README "Development"), so only runs that surely cannot fit are refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

MB = 2**20
# Activation bytes kept for backward per latent pixel and top-level UNet channel, per sample: a floor (SD 1.5
# at 512 px keeps ~240×; gradient checkpointing keeps about an eighth of it).
ACTIVATION_FACTOR = 120
# A VAE encoding at full resolution holds ~8 maps of 128 channels per pixel at once (the same kind of floor).
VAE_FACTOR = 8 * 128
KEEP_CHECKPOINTS = 3  # checkpoint.py keeps the newest three; one more is written before the oldest is pruned


class PreflightError(ConfigError):
    """The run cannot work as configured; the message names the value and the fix."""


def check_writable(folder: Path, what: str) -> None:
    """Create, write, fsync and delete a file in `folder`: the one honest test of "can we write here"."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PreflightError(f"{what} {folder} is not writable ({e.strerror or e}); choose another folder or fix "
                             "its permissions") from None


def free_bytes(folder: Path) -> int:
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def space_needed(n_lora_params: int, cfg: TrainConfig) -> tuple[int, int]:
    """(bytes in the run folder, bytes in the LoRA folder) a run may need at its peak."""
    export = n_lora_params * (2 if cfg.output.save_precision == "fp16" else 4)
    # A checkpoint: fp32 LoRA + two AdamW moments + its step LoRA; Prodigy keeps a little more (x1.5 margin).
    checkpoint = int((n_lora_params * 4 * 3 + export) * 1.5)
    samples = 2 * MB * max(1, len(cfg.sample.prompts))
    return (KEEP_CHECKPOINTS + 1) * checkpoint + samples + MB, 2 * export + 2 * MB


def check_space(run_dir: Path, lora_dir: Path, n_lora_params: int, cfg: TrainConfig) -> None:
    need_run, need_out = space_needed(n_lora_params, cfg)
    same_disk = _device(run_dir) == _device(lora_dir)
    for folder, need in ([(run_dir, need_run + need_out)] if same_disk else
                         [(run_dir, need_run), (lora_dir, need_out)]):
        free = free_bytes(folder)
        if free < need:
            raise PreflightError(f"not enough free space for {folder}: the run needs about {need / MB:.0f} MB "
                                 f"(checkpoints, samples and the LoRA) and {free / MB:.0f} MB are free; free some "
                                 "space or choose another folder (output.run_dir / output.lora_dir)")


def _device(folder: Path) -> int:
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return folder.stat().st_dev


def narrowest_layer(modules: list[tuple[str, torch.nn.Module]]) -> tuple[int, str]:
    """(width, name) of the narrowest Linear / 1x1 Conv2d among the LoRA targets."""
    best = (1 << 62, "")
    for name, m in modules:
        if isinstance(m, torch.nn.Linear):
            width = min(m.in_features, m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            width = min(m.in_channels, m.out_channels)
        else:
            continue
        best = min(best, (width, name))
    return best


def lora_targets(unet, text_encoders: list, conv: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """The modules the LoRA will adapt (network.py's targets), by name; `conv`: with LoCon's."""
    from .network import base_layer, text_target_names, unet_target_names

    out = [(n, base_layer(unet.get_submodule(n))) for n in unet_target_names(unet, conv=conv)]
    return out + [(n, base_layer(te.get_submodule(n))) for te in text_encoders for n in text_target_names(te)]


def check_rank(rank: int, targets: list[tuple[str, torch.nn.Module]], key: str = "network.rank") -> None:
    width, name = narrowest_layer(targets)
    if name and rank > width:
        raise PreflightError(f"`{key}` = {rank} is wider than the narrowest layer it adapts ({name}: {width} "
                             f"features), so it adds nothing but memory; choose a rank ≤ {width}")


def check_ranks(net, unet, text_encoders: list) -> None:
    """network.rank against the layers it adapts, network.conv_rank (LoCon) against the 3x3 convolutions."""
    from .network import conv_target_names, unet_target_names

    conv = net.conv_rank > 0
    targets = lora_targets(unet, text_encoders, conv=conv)
    wide = set(conv_target_names(unet, unet_target_names(unet, conv=conv)))
    check_rank(net.rank, [t for t in targets if t[0] not in wide])
    if net.conv_rank:
        check_rank(net.conv_rank, [t for t in targets if t[0] in wide], "network.conv_rank")


def check_clip_skip(clip_skip: int, text_encoders: list) -> None:
    for te in text_encoders:
        layers = te.config.num_hidden_layers
        if clip_skip >= layers:
            raise PreflightError(f"`model.clip_skip` = {clip_skip} skips all {layers} layers of the text encoder; "
                                 "use 1 (the last layer) or 2 (the penultimate)")


def available_memory(device: torch.device) -> int | None:
    """Bytes the run can still allocate on its device; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_memory(cfg: TrainConfig, unet_channels: int, vae_scale: int, elem_size: int) -> int:
    """A floor on the bytes one step holds at once: the UNet's kept activations for the largest bucket and the
    batch, or the VAE encoding one full-resolution image when latents are encoded."""
    tr, data = cfg.training, cfg.data
    area = data.resolution ** 2  # a bucket's pixel budget; bigger sides come with smaller other sides
    unet = tr.batch_size * (area // vae_scale**2) * unet_channels * elem_size * ACTIVATION_FACTOR
    if tr.gradient_checkpointing:
        unet //= 8
    vae = area * VAE_FACTOR * 4  # every family's VAE runs in fp32
    return max(unet, vae)


def check_memory(cfg: TrainConfig, unet, vae, device: torch.device, elem_size: int) -> None:
    available = available_memory(device)
    if available is None:
        return
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    need = step_memory(cfg, unet.config.block_out_channels[0], vae_scale, elem_size)
    if need > available:
        raise PreflightError(
            f"`data.resolution` = {cfg.data.resolution} at `training.batch_size` = {cfg.training.batch_size} needs "
            f"at least {need / 2**30:.1f} GB for one step and {available / 2**30:.1f} GB are available on the "
            f"{device.type}; lower the resolution or the batch size (or turn on training.gradient_checkpointing)")
