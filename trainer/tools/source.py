"""A LoRA file as the tools see it: its family, metadata, storage dtype and one weight delta per module.

Every tool works on deltas (ΔW per module, multiplier 1), so whatever format a file is in, resize, merge and bake
treat it alike; plain low-rank entries also keep their up/down factors, which lets merge concatenate exactly and
the SVD skip forming large matrices.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.lora_file import LoraFileError, detect_family, read_lora

PART_OF_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}


@dataclass
class ModuleDelta:
    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # module path, as in named_modules()
    up: torch.Tensor | None = None  # plain low-rank entries: ΔW = scale · up @ down
    down: torch.Tensor | None = None
    scale: float = 1.0

    def delta(self) -> torch.Tensor:
        up, down = self.up.float(), self.down.float()
        full = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        shape = (up.shape[0], *down.shape[1:]) if down.dim() == 4 else full.shape
        return (self.scale * full).reshape(shape)


@dataclass
class LoraDeltas:
    path: Path
    family: str  # "sd1" | "sd2" | "sdxl" | "unknown"
    metadata: dict[str, str]
    dtype: torch.dtype  # of its stored weights: outputs keep it (bf16 becomes fp16, which every loader reads)
    deltas: list[ModuleDelta]


def _kohya_module(prefix: str, name: str) -> str:
    """A kohya name without its prefix → a dotted path that kohya_module_name() turns back into the same name."""
    rest = name[len(prefix):]
    if prefix.startswith("lora_te") and rest.startswith("text_model_"):
        return "text_model." + rest[len("text_model_"):]
    return rest


def load_deltas(path: str | Path) -> LoraDeltas:
    path = Path(path)
    tensors, metadata = read_lora(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = t
    deltas = []
    for name, leaves in modules.items():
        prefix = next((p for p in sorted(PART_OF_PREFIX, key=len, reverse=True) if name.startswith(p)), None)
        if prefix is None or "lora_down.weight" not in leaves or "lora_up.weight" not in leaves:
            raise LoraFileError(f"{path}: module {name} is not a plain kohya LoRA entry; only kohya LoRA files "
                                f"are read by this version of the tools")
        down, up = leaves["lora_down.weight"], leaves["lora_up.weight"]
        alpha = float(leaves["alpha"]) if "alpha" in leaves else float(down.shape[0])
        deltas.append(ModuleDelta(PART_OF_PREFIX[prefix], _kohya_module(prefix, name), up, down,
                                  alpha / down.shape[0]))
    if not deltas:
        raise LoraFileError(f"{path} holds no LoRA modules; pick a LoRA .safetensors file")
    stored = next(iter(tensors.values())).dtype
    dtype = torch.float16 if stored == torch.bfloat16 else stored
    return LoraDeltas(path, detect_family(tensors, metadata), metadata, dtype, deltas)


def bind(lora: LoraDeltas, names: dict[str, set[str]]) -> LoraDeltas:
    """The deltas with their modules named as in a model (`names`: part → module paths); a module the model
    does not have is a LoraFileError naming it."""
    index = {part: {n.replace(".", "_"): n for n in paths} for part, paths in names.items()}
    for d in lora.deltas:
        flat = d.module.replace(".", "_")
        found = index.get(d.part, {}).get(flat) or index.get(d.part, {}).get(flat.removeprefix("text_model_"))
        if found is None:
            raise LoraFileError(f"{lora.path.name}: its module {d.module} ({d.part}) is not in the base model: "
                                f"pick a base model of the family the LoRA was trained for")
        d.module = found
    return lora


Weight = float | tuple[float, float]  # one multiplier, or (UNet, text encoders) as the generators take them


def part_weight(weight: Weight, part: str) -> float:
    if isinstance(weight, (tuple, list)):
        return float(weight[0] if part == "unet" else weight[1])
    return float(weight)


def weight_text(weight: Weight) -> str:
    if isinstance(weight, (tuple, list)) and float(weight[0]) != float(weight[1]):
        return f"{float(weight[0]):g} UNet/{float(weight[1]):g} TE"
    return f"{part_weight(weight, 'unet'):g}"
