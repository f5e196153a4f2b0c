"""What the tools write: plain kohya LoRA files (the format A1111, ComfyUI and diffusers all load, formats.md) with
fresh metadata, and the rules every output follows: never an input, never an existing file unless asked."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import StudioError
from trainer.families import FAMILIES
from trainer.lora_file import kohya_module_name, save_lora

# Run information that stays true of a LoRA after resizing or converting: what it was trained on and how.
KEPT_KEYS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_sd_model_name", "ss_clip_skip",
             "ss_training_started_at", "ss_training_finished_at", "ss_resolution", "ss_num_train_images",
             "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer",
             "ss_seed", "ss_mixed_precision", "modelspec.trigger_phrase", "modelspec.resolution",
             "modelspec.prediction_type", "modelspec.architecture", "modelspec.thumbnail")


Progress = Callable[[float, str], None]  # (fraction done, what is being done)


class ToolError(StudioError):
    """A tool's refusal: one sentence naming the file or value and the fix."""


@dataclass
class ToolResult:
    path: Path
    lines: list[str] = field(default_factory=list)  # what the CLI prints and the UI shows


@dataclass
class LowRank:
    """One module of an output LoRA: ΔW = (alpha / rank) · up @ down."""
    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool,
                 suffix: str | None = ".safetensors") -> Path:
    """The output path, or a ToolError: it must not be an input, nor an existing file unless `overwrite`."""
    out = Path(out).expanduser()
    if suffix and out.suffix.lower() != suffix:
        raise ToolError(f"{out}: the output must end in {suffix}, e.g. {out.with_suffix(suffix).name}")
    if any(c in out.stem for c in ":,"):
        raise ToolError(f"{out}: A1111's <lora:name:weight> syntax splits names at ':' and ','; rename it "
                        f"without them")
    for given in inputs:
        if Path(given).expanduser().resolve() == out.resolve():
            raise ToolError(f"{out} is also an input: write the result under a new name")
    if out.exists() and not overwrite:
        raise ToolError(f"{out} already exists: choose another output name, or ask to replace it (--overwrite)")
    return out


def te_prefixes(family: str, entries: list[LowRank]) -> dict[str, str]:
    """Part → kohya prefix. SDXL's encoders are te1/te2: A1111 ignores `lora_te_` on SDXL."""
    sdxl = family == "sdxl" or any(e.part == "text_encoder_2" for e in entries)
    return {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_tensors(entries: list[LowRank], family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    prefixes = te_prefixes(family, entries)
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        name = kohya_module_name(prefixes[e.part], e.module)
        out[f"{name}.lora_down.weight"] = e.down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = e.up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(e.alpha), dtype=torch.float32)  # fp32 keeps alpha exact
    return out


def lora_metadata(out: Path, family: str, entries: list[LowRank], kept: dict[str, str] | None,
                  comment: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya + ModelSpec metadata of a tool's output. `kept`: the source's metadata, of which what stays true of the
    result is carried over (KEPT_KEYS); dimensions, name, title and date are the output's own."""
    ranks = sorted({e.rank for e in entries})
    alphas = sorted({e.alpha for e in entries})
    meta = {k: v for k, v in (kept or {}).items() if k in KEPT_KEYS}
    meta.update({
        "ss_network_module": "networks.lora",
        # kohya's resize writes "Dynamic" when modules differ; loaders read the tensors' own shapes either way.
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic",
        "ss_network_args": json.dumps({}),
        "ss_network_train_unet_only": str(not any(e.part != "unet" for e in entries)),
        "ss_output_name": out.stem,
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": "diffusers",
        "modelspec.title": out.stem,
        "modelspec.description": comment,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    })
    if family in FAMILIES:  # "sd1" | "sd2" | "sd2-v" | "sdxl"; a LoRA file alone cannot tell sd2 from sd2-v
        fam = FAMILIES[family]
        meta["ss_base_model_version"] = fam.base_model_version
        meta["ss_v2"] = str(fam.arch == "sd2")
        meta.setdefault("modelspec.architecture", fam.architecture)
        meta.setdefault("modelspec.prediction_type", fam.prediction_type)
        meta.setdefault("modelspec.resolution", f"{fam.resolution}x{fam.resolution}")
    meta.update(extra or {})
    return meta


def write_lora(out: Path, entries: list[LowRank], family: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """Atomic (temporary name, then rename): a crash leaves the old file or the new one, never half of one."""
    if not entries:
        raise ToolError(f"{out}: nothing to write: the result has no LoRA modules")
    return save_lora(out, kohya_tensors(entries, family, dtype), metadata)


def part_lines(entries: list[LowRank], kept: dict[str, float], total: dict[str, float]) -> list[str]:
    """One line per part: modules, ranks and the share of the deltas' energy (Σ s², Frobenius²) kept."""
    lines = []
    for part in ("unet", "text_encoder", "text_encoder_2"):
        mine = [e for e in entries if e.part == part]
        if not mine:
            continue
        ranks = [e.rank for e in mine]
        share = kept[part] / total[part] if total.get(part) else 1.0
        mean = sum(ranks) / len(ranks)
        span = f"rank {ranks[0]}" if min(ranks) == max(ranks) else f"ranks {min(ranks)}–{max(ranks)} (mean {mean:.1f})"
        lines.append(f"{part}: {len(mine)} modules, {span}, kept {100 * share:.2f}% of the energy "
                     f"(Σ s² of the singular values)")
    return lines
