"""Best low-rank approximations of weight deltas: the singular value decomposition, the choice of rank (fixed, or
kohya resize_lora.py's dynamic rules) and the split into a LoRA's up/down factors.

By Eckart–Young the SVD truncated to rank r is the best rank-r approximation in the Frobenius norm, and its error
is exactly the discarded singular values: ‖ΔW − ΔW_r‖_F = sqrt(Σ_{i>r} s_i²).
"Kept energy" is Σ_{i≤r} s_i² / Σ s_i².
A convolution's delta [out, in, k, k] is decomposed as the matrix [out, in·k·k], as kohya's LoCon stores it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import StudioError

DYNAMIC_METHODS = {
    "sv_ratio": "keep the singular values at least the largest / X (X > 1)",
    "sv_fro": "keep the fewest values whose Frobenius norm is at least the fraction X of the whole (0 < X ≤ 1)",
    "sv_cumulative": "keep the fewest values whose sum is at least the fraction X of the sum of all (0 < X ≤ 1)",
}


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: at most `max_rank` (None: no cap), fewer under a dynamic `method`."""
    max_rank: int | None = None
    method: str = "fixed"  # "fixed" | one of DYNAMIC_METHODS
    value: float = 0.0

    def describe(self) -> str:
        if self.method == "fixed":
            return f"rank {self.max_rank}" if self.max_rank else "full rank"
        return f"{self.method} {self.value:g}, " + (f"rank ≤ {self.max_rank}" if self.max_rank else "any rank")


def parse_dynamic(text: str, max_rank: int | None) -> RankRule:
    """`sv_fro:0.9` → RankRule; the message of a refusal names the value and what is allowed."""
    method, _, value = (text or "").partition(":")
    if method not in DYNAMIC_METHODS:
        raise StudioError(f"--dynamic {text!r}: use sv_ratio:X, sv_fro:X or sv_cumulative:X, e.g. sv_fro:0.9")
    try:
        x = float(value)
    except ValueError:
        raise StudioError(f"--dynamic {text!r}: {value!r} is not a number; write it like {method}:0.9") from None
    if method == "sv_ratio" and not x > 1 or method != "sv_ratio" and not 0 < x <= 1:
        raise StudioError(f"--dynamic {text!r}: {DYNAMIC_METHODS[method]}")
    return RankRule(max_rank, method, x)


def choose_rank(s: torch.Tensor, rule: RankRule, tol: float = 1e-7) -> int:
    """How many of the singular values `s` (descending) to keep; at least 1, never more than are above rounding
    noise (tol · the largest: numpy's matrix_rank rule)."""
    s = s.double()
    nonzero = int((s > s[0] * tol).sum()) if len(s) and s[0] > 0 else 1
    if rule.method == "sv_ratio":
        r = int((s >= s[0] / rule.value).sum())
    elif rule.method == "sv_fro":
        fraction = torch.cumsum(s**2, 0) / (s**2).sum()
        r = int(torch.searchsorted(fraction, torch.tensor(rule.value**2, dtype=s.dtype) - 1e-12)) + 1
    elif rule.method == "sv_cumulative":
        fraction = torch.cumsum(s, 0) / s.sum()
        r = int(torch.searchsorted(fraction, torch.tensor(rule.value, dtype=s.dtype) - 1e-12)) + 1
    else:
        r = len(s)
    r = min(r, nonzero, rule.max_rank or r)
    return max(1, r)


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a delta as a matrix [out, in·k·k], in float32."""
    return torch.linalg.svd(delta.reshape(delta.shape[0], -1).float(), full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of up @ down ([out, r] @ [r, in·k·k]) without forming the product: QR of both factors, then the SVD
    of the small r×r core. Exact, and fast where the full matrix would be large: on SD 1.5's 264 modules at rank 32,
    0.58 CPU s against 84 for the full SVD, one thread (scripts/bench/tools_svd.py)."""
    up = up.reshape(up.shape[0], -1).double()
    down = down.reshape(down.shape[0], -1).double()
    qu, ru = torch.linalg.qr(up)  # up = qu ru
    qd, rd = torch.linalg.qr(down.T)  # down = rd^T qd^T
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return (qu @ u).float(), s.float(), (vh @ qd.T).float()


@dataclass
class Factors:
    """A rank-r factorisation up @ down of a delta, scale 1 (alpha = rank), with what truncation kept."""
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    down: torch.Tensor  # [r, in] or [r, in, k, k]
    kept: float  # Σ kept s²
    total: float  # Σ s²

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: torch.Size, rule: RankRule) -> Factors:
    """Keep the rule's number of singular triplets and split them as up = U·√S, down = √S·Vh: balanced factors
    keep both in fp16's range. `shape` is the delta's ([out, in] or [out, in, k, k])."""
    # float32 SVD rounding: values below max(m, n) · eps · s_max are noise, not rank (numpy's matrix_rank)
    r = choose_rank(s, rule, tol=max(u.shape[0], vh.shape[1]) * torch.finfo(torch.float32).eps)
    root = s[:r].clamp(min=0).sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    energy = s.double() ** 2
    return Factors(up.contiguous(), down.contiguous(), float(energy[:r].sum()), float(energy.sum()))
