"""Writing a run's LoRA file (`export_lora`, used by the loop at checkpoints and at the end) and
`python -m trainer export RUN_DIR [--step N] --out FILE`: a LoRA file from a run's checkpoint.

The command is the way back when a run's own export failed (a full or read-only output folder) or a user wants an earlier step:
the checkpoint holds the fp32 weights and, since checkpoints carry it, what the run knew for the file's metadata.
A checkpoint whose weights are not finite is refused, never exported.
"""
from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import torch

from .checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .locks import output_lock
from .lora_file import diffusers_metadata, save_lora, text_encoder_prefixes, to_diffusers, to_kohya
from .metadata import RunInfo, build_metadata
from .step_guard import non_finite


def part_names(n_encoders: int) -> list[str]:
    return ["text_encoder", "text_encoder_2"][:n_encoders]


def export_lora(cfg: TrainConfig, lora: dict[str, dict[str, torch.Tensor]], path: Path, info: RunInfo,
                is_sdxl: bool) -> Path:
    """The LoRA file (kohya format, or diffusers'), with its metadata, written atomically."""
    dtype = torch.float16 if cfg.output.save_precision == "fp16" else torch.float32
    meta = build_metadata(cfg, info, path.stem)
    if cfg.output.format == "diffusers":
        meta = {"lora_studio.format": "diffusers (loads in diffusers only, not A1111/ComfyUI)",
                **{k: v for k, v in meta.items() if k.startswith("modelspec.")}}
        meta["lora_adapter_metadata"] = diffusers_metadata(lora, cfg.network.alpha, cfg.network.conv_alpha)
        return save_lora(path, to_diffusers(lora, dtype), meta)
    n_te = 2 if is_sdxl else 1
    prefixes = dict(zip(part_names(n_te), text_encoder_prefixes(n_te)))
    parts = {("lora_unet_" if name == "unet" else prefixes[name]): state for name, state in lora.items()}
    return save_lora(path, to_kohya(parts, cfg.network.alpha, dtype, cfg.network.conv_alpha), meta)


def thumbnail(image) -> str:
    """A sample as the small JPEG data URL of modelspec.thumbnail."""
    small = image.convert("RGB").copy()
    small.thumbnail((256, 256))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class ExportError(ConfigError):
    """The run or checkpoint cannot be exported; the message names it and the fix."""


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"{run_dir} is not a run folder (it has no config.toml); pass the folder a training wrote "
                          "into, e.g. runs/my-style")
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ExportError(f"{run_dir} has no complete checkpoint to export (checkpoints/ is empty)")
        return found
    found = checkpoint_dir(run_dir, step)
    if not (found / "state.pt").is_file():
        steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*[0-9]")
                       if (p / "state.pt").is_file())
        raise ExportError(f"{run_dir} has no checkpoint at step {step}; its checkpoints are at steps "
                          f"{', '.join(map(str, steps)) or '(none)'}")
    return found


def run_info(cfg: TrainConfig, state: dict):
    """The RunInfo a checkpoint stored; for older checkpoints, what the config and the base model still tell."""
    from .families import detect_family
    from .metadata import base_model_name
    from .models import default_base_model

    if isinstance(state.get("run_info"), dict):
        known = {f.name for f in dataclasses.fields(RunInfo)}
        return RunInfo(**{k: v for k, v in state["run_info"].items() if k in known})
    base = Path(cfg.model.base_model) if cfg.model.base_model else default_base_model()
    family = detect_family(base)
    return RunInfo(family.base_model_version, family.architecture, family.prediction_type, base_model_name(base),
                   int(state.get("step", 0)), int(state.get("epoch", 0)), 0, 0.0,
                   cfg.training.mixed_precision, cfg.optimizer.optimizer)


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: the LoRA file must end in .safetensors")
    ckpt = find_checkpoint(run_dir, step)
    cfg = load_config(run_dir / "config.toml")
    lora, state = load_checkpoint(ckpt)
    bad = non_finite(lora)
    if bad:
        raise ExportError(f"the checkpoint {ckpt} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                          "export an earlier step with --step")
    info = run_info(cfg, state)
    info.steps = int(state.get("step", info.steps))
    with output_lock(out):
        return export_lora(cfg, lora, out, info, info.family_version.startswith("sdxl"))

