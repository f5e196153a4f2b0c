"""`python -m trainer resize`: a LoRA at a smaller (or per-module dynamic) rank, by truncated SVD of each delta.

The result is the best approximation at the chosen rank (lowrank.py); what each part keeps of the deltas' energy
is reported, so a user sees the price of a smaller file before using it.
"""
from __future__ import annotations

from pathlib import Path

from .lowrank import RankRule, svd, svd_of_product, truncate
from .output import LowRank, Progress, ToolError, ToolResult, check_output, lora_metadata, part_lines, write_lora
from .source import load_deltas


def low_rank(delta, rule: RankRule) -> tuple[LowRank, float, float]:
    """A ModuleDelta at the rule's rank: (entry with alpha = rank, kept Σ s², total Σ s²)."""
    if delta.up is not None:  # plain low-rank: the SVD of up @ down without forming it
        u, s, vh = svd_of_product(delta.up.float() * delta.scale, delta.down.float())
        shape = (delta.up.shape[0], *delta.down.shape[1:]) if delta.down.dim() == 4 else None
    else:
        full = delta.delta()
        u, s, vh = svd(full)
        shape = full.shape if full.dim() == 4 else None
    f = truncate(u, s, vh, shape or (u.shape[0], vh.shape[1]), rule)
    return LowRank(delta.part, delta.module, f.up, f.down, float(f.rank)), f.kept, f.total


def resize(src: str | Path, out: str | Path, rule: RankRule, overwrite: bool = False,
           progress: Progress | None = None) -> ToolResult:
    src = Path(src)
    if rule.method == "fixed" and rule.max_rank is None:
        raise ToolError("resize needs the new rank: give --rank R (a whole number ≥ 1) or --dynamic METHOD:X")
    if rule.max_rank is not None and rule.max_rank < 1:
        raise ToolError(f"--rank {rule.max_rank}: the rank must be a whole number ≥ 1, e.g. --rank 8")
    out = check_output(out, [src], overwrite)
    lora = load_deltas(src)
    entries, kept, total = [], {}, {}
    for i, d in enumerate(lora.deltas):
        entry, k, t = low_rank(d, rule)
        entries.append(entry)
        kept[d.part] = kept.get(d.part, 0.0) + k
        total[d.part] = total.get(d.part, 0.0) + t
        if progress and i % 16 == 0:
            progress(i / len(lora.deltas), f"SVD of module {i + 1} of {len(lora.deltas)}")
    comment = f"resized from {src.name} ({rule.describe()})"
    meta = lora_metadata(out, lora.family, entries, lora.metadata, comment)
    write_lora(out, entries, lora.family, lora.dtype, meta)
    return ToolResult(out, [f"wrote {out}: {comment}", *part_lines(entries, kept, total)])
