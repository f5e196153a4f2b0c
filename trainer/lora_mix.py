"""A LoRA mix merged into a model's weights, as A1111 and ComfyUI apply one: no per-step cost, exactly undoable.

Each patched module keeps its base weight W0 (a copy in the model's dtype and in host memory, taken the first time
it is patched) and always holds W = round(W0 + Σ_i w_i · ΔW_i), summed in float32 from W0 in the mix's order and
rounded to the model's dtype once. So a module's weight depends only on the current mix, never on the mixes before it (no fp16/bf16 drift),
and a module no mix touches any more gets W0 back bit for bit. Changing one LoRA's weight rewrites only the modules
that LoRA touches; the others are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora_targets import ModuleDelta


@dataclass(frozen=True)
class MixItem:
    key: tuple  # identifies the file's content (path, mtime, size): an edited file counts as another LoRA
    deltas: tuple[ModuleDelta, ...]
    unet_weight: float
    te_weight: float

    def weight(self, part: str) -> float:
        return self.unet_weight if part == "unet" else self.te_weight


class MergedMix:
    def __init__(self, parts: dict[str, torch.nn.Module]):
        self.modules = {part: dict(model.named_modules()) for part, model in parts.items()}
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # (part, module) → W0, for patched modules only
        self._held: dict[tuple[str, str], tuple] = {}  # (part, module) → ((item key, weight), …) it now holds

    def apply(self, items: list[MixItem]) -> int:
        """Make the model hold exactly this mix; returns how many modules were rewritten."""
        wanted: dict[tuple[str, str], list[tuple[MixItem, ModuleDelta]]] = {}
        for item in items:
            for d in item.deltas:
                if item.weight(d.part) != 0:  # weight 0 is the base weight itself, not W0 + 0·ΔW rounded
                    wanted.setdefault((d.part, d.module), []).append((item, d))
        rewritten = 0
        for target in list(self._held) + [t for t in wanted if t not in self._held]:
            contributions = wanted.get(target, [])
            signature = tuple((item.key, item.weight(d.part)) for item, d in contributions)
            if self._held.get(target, ()) != signature:
                self._write(target, contributions, signature)
                rewritten += 1
        return rewritten

    @torch.no_grad()
    def _write(self, target: tuple[str, str], contributions: list, signature: tuple) -> None:
        weight = self.modules[target[0]][target[1]].weight
        if not contributions:
            weight.copy_(self._base.pop(target))
            del self._held[target]
            return
        # W0 waits in host memory (as A1111 keeps its backups): on a GPU it would double the patched weights' VRAM
        base = self._base.setdefault(target, weight.detach().to("cpu", copy=True))
        total = base.to(weight.device, torch.float32, copy=True)
        flat = total.view(total.shape[0], -1)
        for item, d in contributions:
            w = item.weight(d.part)
            if d.up is not None:  # low rank: no full-size ΔW temporary
                flat.addmm_(d.up.flatten(1).to(flat.device), d.down.flatten(1).to(flat.device), alpha=w * d.scale)
            else:
                total.add_(d.delta().to(total.device), alpha=w)
        weight.copy_(total)
        self._held[target] = signature

    def clear(self) -> None:
        """Every module back to its base weight."""
        self.apply([])
