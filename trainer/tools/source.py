"""A LoRA file as the tools see it: its family, metadata, storage dtype and one weight delta per module.

Files of every format are read by trainer.lora_formats; every tool works on the deltas (ΔW per module, multiplier
1), so resize, merge and bake treat a LoHa like a kohya LoRA. Plain low-rank entries also keep their up/down
factors, which lets merge concatenate exactly and the SVD skip forming large matrices.

Which module an entry updates is decided against a model: bake and extract have one. resize and merge have only
the file, and a LoRA may be for a model of any width (the demo model is tiny), so its modules are looked up in a
weightless skeleton of its family (module names and kernel sizes depend on the topology alone) and each delta
takes its size from the file.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.lora_file import LoraFileError
from trainer.lora_formats import LoraFile, read_lora
from trainer.lora_targets import ModuleDelta, TargetIndex, module_deltas

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TRIED = ("sd1", "sdxl", "sd2")  # a file that does not say its family: the first whose modules it all matches


@dataclass
class LoraDeltas:
    path: Path
    family: str  # "sd1" | "sd2" | "sdxl" | "unknown"
    metadata: dict[str, str]
    dtype: torch.dtype  # of its stored weights: outputs keep float32, anything else becomes fp16 (loaders' widest)
    deltas: list[ModuleDelta]


@functools.lru_cache(maxsize=4)
def skeleton(family: str, config_dir: Path | None = None) -> dict[str, torch.nn.Module]:
    """{"unet", "text_encoder"[, "text_encoder_2"]} of a family's config on the meta device: no weights, no memory."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(config_dir) if config_dir else MODEL_CONFIGS_DIR / family
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True))}
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if (folder / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return parts


def _shape(entry, module: torch.nn.Module) -> torch.Size:
    """ΔW's shape: out and in from the file, the kernel from the module (a topology fact, the same at any width)."""
    out, fan_in = entry.out_and_in()
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return torch.Size((out, fan_in // (kh * kw), kh, kw))
    return torch.Size((out, fan_in))


def file_shaped_deltas(lora: LoraFile) -> tuple[str, list[ModuleDelta]]:
    """(family, deltas) with modules found in a skeleton of the family and sizes taken from the file."""
    families = [lora.family] if lora.family in TRIED else list(TRIED)
    missing = None
    for family in families:
        parts = skeleton(family)
        index = TargetIndex(parts)
        deltas = []
        for entry in lora.entries:
            found = index.candidates(entry)
            if not found:
                missing = missing or entry.keys[0]
                break
            part, name = found[0]
            deltas.append(ModuleDelta(part, name, entry, _shape(entry, index.modules[part][name])))
        else:
            return family, deltas
    raise LoraFileError(f"{lora.name}: {missing} matches no module of an SD 1.x, SD 2.x or SDXL model: this LoRA is "
                        f"for another architecture, which the tools do not handle")


def load_deltas(path: str | Path, parts: dict[str, torch.nn.Module] | None = None,
                base: tuple[str, str] | None = None) -> LoraDeltas:
    """A LoRA file's deltas, resolved against `parts` (a model's UNet and text encoders) or, without, a skeleton.
    base: (name, "sd1" | "sd2" | "sdxl") of the model it is for: a LoRA of another family is refused by name."""
    lora = read_lora(path)
    if base is not None and lora.family not in ("unknown", base[1]):
        raise LoraFileError(f"{lora.name} is a {lora.family} LoRA but the base model {base[0]} is {base[1]}: use "
                            f"a {lora.family} base model")
    if parts is not None:
        family, deltas = lora.family, module_deltas(lora, parts)
    else:
        family, deltas = file_shaped_deltas(lora)
    if not deltas:
        raise LoraFileError(f"{lora.name} holds no LoRA modules; pick a LoRA .safetensors file")
    dtype = torch.float32 if lora.dtype == "float32" else torch.float16
    return LoraDeltas(lora.path, family, lora.metadata, dtype, deltas)


Weight = float | tuple[float, float]  # one multiplier, or (UNet, text encoders) as the generators take them


def part_weight(weight: Weight, part: str) -> float:
    if isinstance(weight, (tuple, list)):
        return float(weight[0] if part == "unet" else weight[1])
    return float(weight)


def weight_text(weight: Weight) -> str:
    if isinstance(weight, (tuple, list)) and float(weight[0]) != float(weight[1]):
        return f"{float(weight[0]):g} UNet/{float(weight[1]):g} TE"
    return f"{part_weight(weight, 'unet'):g}"
