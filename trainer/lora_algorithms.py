"""What each LoRA algorithm's weight update ΔW is, from the tensors a file stores for one module.

Shapes, with r the rank and W the module's weight [out, in] (Linear) or [out, in, kh, kw] (Conv2d):
  lora    down [r, in(, kh, kw)], up [out, r(, 1, 1)]:        ΔW = up @ down             (kohya LoRA, LoCon, diffusers, PEFT)
  tucker  down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]: the three convolutions in a row, as one
  loha    w1 = w1a @ w1b, w2 = w2a @ w2b, each [out, in·kh·kw]: ΔW = w1 ⊙ w2         (LyCORIS LoHa)
          with Tucker: w = t ×₁ wa ×₂ wb, t [r, r, kh, kw], wa [r, out], wb [r, in]
  lokr    w1 [a, b] (or w1a @ w1b), w2 [c, d(, kh, kw)] (or w2a @ w2b, or Tucker t2, w2a, w2b): ΔW = w1 ⊗ w2,
          out = a·c, in = b·d                                                        (LyCORIS LoKr)
Each is then multiplied by the entry's scale (alpha / rank, or a PEFT config's scaling); see lora_formats.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# The tensors each algorithm needs ("|" separates alternatives), by role name; roles are the file's own leaf names.
REQUIRED = {
    "lora": ("down", "up"),
    "tucker": ("down", "up", "mid"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1|lokr_w1_a", "lokr_w2|lokr_w2_a"),
}


@dataclass
class Entry:
    """One module's update as the file stores it."""
    name: str  # the module as the file names it: a kohya name (`lora_unet_…`) or a module path (`down_blocks.0…`)
    part: str | None  # "unet" | "text_encoder" | "text_encoder_2"; None when the file does not say (PEFT)
    algorithm: str  # "lora" | "tucker" | "loha" | "lokr"
    tensors: dict[str, torch.Tensor]  # role → tensor
    keys: list[str] = field(default_factory=list)  # the file's keys this entry consumes, for messages
    alpha: float | None = None  # as stored; None when the file has none
    scale: float = 1.0  # the multiplier of the algorithm's product at weight 1.0

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.algorithm in ("lora", "tucker"):
            return t["down"].shape[0]
        if self.algorithm == "loha":
            return t["hada_w1_b"].shape[0]
        return lokr_rank(t)

    def out_and_in(self) -> tuple[int, int]:
        """(output features, input features × kernel size) of ΔW, from the factors' shapes alone."""
        t = self.tensors
        if self.algorithm in ("lora", "tucker"):
            kernel = math.prod(t["mid"].shape[2:]) if "mid" in t else 1
            return t["up"].shape[0], t["down"][0].numel() * kernel
        if self.algorithm == "loha":
            if "hada_t1" in t:
                return t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * math.prod(t["hada_t1"].shape[2:])
            return t["hada_w1_a"].shape[0], t["hada_w1_b"][0].numel()
        (a, b), (c, d) = _lokr_factor_shapes(t)
        return a * c, b * d

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """ΔW at weight 1.0, float32, reshaped to the module's weight `shape`."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.algorithm == "lora":
            w = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.algorithm == "tucker":
            w = torch.einsum("ijhw,oi,jc->ochw", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
        elif self.algorithm == "loha":
            w = _hada_factor(t, "1") * _hada_factor(t, "2")
        else:
            w = _kron(_lokr_w(t, "1"), _lokr_w(t, "2"))
        return (w * self.scale).reshape(shape)


def _rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """core [r, r, kh, kw], wa [r, out], wb [r, in] → [out, in, kh, kw] (LyCORIS's Tucker rebuild)."""
    return torch.einsum("ijhw,io,jc->ochw", core, wa, wb)


def _hada_factor(t: dict, i: str) -> torch.Tensor:
    if f"hada_t{i}" in t:
        return _rebuild_tucker(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])
    return t[f"hada_w{i}_a"].flatten(1) @ t[f"hada_w{i}_b"].flatten(1)


def _lokr_w(t: dict, i: str) -> torch.Tensor:
    if f"lokr_w{i}" in t:
        return t[f"lokr_w{i}"]
    if f"lokr_t{i}" in t:
        return _rebuild_tucker(t[f"lokr_t{i}"], t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"])
    b = t[f"lokr_w{i}_b"]
    # a 4-D w2_b [r, d, kh, kw] (a conv without Tucker) gives w2 [c, d, kh, kw]
    return (t[f"lokr_w{i}_a"] @ b.flatten(1)).reshape(-1, *b.shape[1:])


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # w1 [a, b] against a conv's w2 [c, d, kh, kw]: w1 as [a, b, 1, 1], so ΔW is [a·c, b·d, kh, kw]
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: einsum outputs need a copy


def lokr_rank(t: dict) -> int | None:
    """LyCORIS: the rank of the factorised w1, else of w2; None (scale 1, alpha unused) when both are full."""
    if "lokr_w1_b" in t:
        return t["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in t:
        return t["lokr_w2_b"].shape[0]
    return None


def _lokr_factor_shapes(t: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    if "lokr_w1" in t:
        a, b = t["lokr_w1"].shape[:2]
    else:
        a, b = t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]
    if "lokr_w2" in t:
        c, d = t["lokr_w2"].shape[0], t["lokr_w2"][0].numel()
    elif "lokr_t2" in t:
        c, d = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * math.prod(t["lokr_t2"].shape[2:])
    else:
        c, d = t["lokr_w2_a"].shape[0], t["lokr_w2_b"][0].numel()
    return (a, b), (c, d)


def default_scale(entry: Entry) -> float:
    """kohya and LyCORIS: alpha / rank; a file without alpha means scale 1.0 (alpha = rank) in every loader;
    LoKr with both factors full ignores alpha (LyCORIS sets alpha = rank there)."""
    rank = entry.rank
    if entry.alpha is None or rank is None:
        return 1.0
    return entry.alpha / rank
