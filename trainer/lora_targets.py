"""Which module of a model each entry of a LoRA file updates, and its ΔW there.

Every entry resolves to exactly one Linear or Conv2d of the given model parts, or the file is refused with one line
naming the first key that matched nothing (or whose shape does not fit): a LoRA is applied whole or not at all,
never silently in part as A1111 and ComfyUI do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .ldm_names import ldm_name
from .lora_algorithms import Entry
from .lora_file import LoraFileError

if TYPE_CHECKING:
    from .lora_formats import LoraFile

KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


@dataclass
class ModuleDelta:
    """One module's update at weight 1.0. For plain low-rank entries `up`, `down` and `scale` are set, in the
    module's layout (Linear: up [out, r], down [r, in]; Conv2d: up [out, r, 1, 1], down [r, in, kh, kw]) so that
    delta() == scale · up.flatten(1) @ down.flatten(1), reshaped; for LoHa, LoKr and Tucker they are None."""
    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # the module's path in named_modules() of that part
    entry: Entry
    weight_shape: torch.Size

    def delta(self) -> torch.Tensor:
        """Full ΔW, float32, the module's weight shape; alpha/rank or PEFT's scaling included."""
        return self.entry.delta(self.weight_shape)

    @property
    def scale(self) -> float | None:
        return self.entry.scale if self.entry.algorithm == "lora" else None

    @property
    def up(self) -> torch.Tensor | None:
        if self.entry.algorithm != "lora":
            return None
        up = self.entry.tensors["up"].float().flatten(1)
        return up.reshape(*up.shape, *[1] * (len(self.weight_shape) - 2))

    @property
    def down(self) -> torch.Tensor | None:
        if self.entry.algorithm != "lora":
            return None
        down = self.entry.tensors["down"].float()
        return down.reshape(down.shape[0], *self.weight_shape[1:])


def _model_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _canonical(part: str, path: str) -> str:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files from before it keep it
    return path.removeprefix("text_model.") if part != "unet" else path


class TargetIndex:
    """The model's modules under every name a file may use for them."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        self.modules = {part: _model_modules(model) for part, model in parts.items()}
        self.kohya: dict[str, tuple[str, str]] = {}
        self.paths: dict[str, dict[str, str]] = {}
        for part, modules in self.modules.items():
            self.paths[part] = {_canonical(part, n): n for n in modules}
            for n in modules:
                if part == "unet":
                    names = [n, ldm_name(n, parts[part].config)] if hasattr(parts[part], "config") else [n]
                else:
                    short = _canonical(part, n)
                    names = [short, "text_model." + short]
                for prefix in KOHYA_PREFIXES.get(part, ()):
                    for name in filter(None, names):
                        self.kohya[prefix + name.replace(".", "_")] = (part, n)

    def candidates(self, entry: Entry) -> list[tuple[str, str]]:
        if entry.name.startswith("lora_"):
            return [self.kohya[entry.name]] if entry.name in self.kohya else []
        parts = [entry.part] if entry.part else list(self.paths)
        return [(p, self.paths[p][_canonical(p, entry.name)]) for p in parts
                if p in self.paths and _canonical(p, entry.name) in self.paths[p]]


def module_deltas(lora: LoraFile, parts: dict[str, torch.nn.Module], model_name: str = "") -> list[ModuleDelta]:
    """Every entry of `lora` resolved to a module of `parts` ({"unet": …, "text_encoder": …, "text_encoder_2": …}),
    or a LoraFileError naming the file, the model (`model_name`, for the message) and the first key that fits nothing."""
    index = TargetIndex(parts)
    model = f"the base model {model_name}" if model_name else "this model"
    out = []
    for entry in lora.entries:
        found = index.candidates(entry)
        if not found:
            where = PART_NAMES.get(entry.part, "model") if entry.part else "UNet or text encoders"
            missing = "" if (entry.part is None or entry.part in parts) else " (it has none)"
            raise LoraFileError(f"{lora.name} does not fit {model}: {entry.keys[0]} matches no module of its "
                                f"{where}{missing}; the LoRA was made for another model family or architecture")
        fits = [(p, n) for p, n in found if _fits(entry, index.modules[p][n].weight.shape)]
        if not fits:
            part, name = found[0]
            shape = "×".join(map(str, index.modules[part][name].weight.shape))
            raise LoraFileError(f"{lora.name} does not fit {model}: {entry.keys[0]} is for a layer of "
                                f"{'×'.join(map(str, entry.out_and_in()))} weights, its {PART_NAMES[part]}'s {name} "
                                f"is {shape} (another model size); pick the base model it was made for")
        part, name = fits[0]
        out.append(ModuleDelta(part, name, entry, index.modules[part][name].weight.shape))
    return out


def _fits(entry: Entry, shape: torch.Size) -> bool:
    return entry.out_and_in() == (shape[0], shape[1:].numel())
