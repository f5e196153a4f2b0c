"""`python -m trainer merge`: several LoRAs, each at a weight, as one plain kohya LoRA.

Without a rank the result is exact: Σ w_i · ΔW_i = [w_1 s_1 up_1 | w_2 s_2 up_2 | …] @ [down_1; down_2; …], the
ranks concatenated. Modules that are not plain low-rank (LoHa, LoKr, Tucker) are converted by an SVD kept to its
numerical rank, so one such file merged alone is its conversion to a plain LoRA. With a rank, each module's summed
delta is truncated to it (the best approximation, lowrank.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .lowrank import RankRule, svd, svd_of_product, truncate
from .output import LowRank, Progress, ToolError, ToolResult, check_output, lora_metadata, part_lines, write_lora
from .source import LoraDeltas, Weight, load_deltas, part_weight, weight_text


def parse_weighted(item: str) -> tuple[str, float]:
    """FILE[:WEIGHT]; a path that itself holds ':' (C:\\…) without a weight stays whole."""
    path, sep, weight = item.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def common_family(loras: list[LoraDeltas]) -> str:
    known = {lora.family for lora in loras if lora.family != "unknown"}
    if len(known) > 1:
        names = ", ".join(f"{lora.path.name} is {lora.family}" for lora in loras if lora.family != "unknown")
        raise ToolError(f"cannot mix LoRAs of different model families ({names}): use LoRAs of one family")
    return known.pop() if known else "unknown"


def _concatenated(terms: list[tuple[float, object]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) with Σ w·ΔW = up @ down, or None when some term is not plain low-rank or shapes disagree."""
    if any(d.up is None for _, d in terms):
        return None
    downs = [d.down.float() for _, d in terms]
    if len({(t.dim(), *t.shape[1:]) for t in downs}) > 1:
        return None
    ups = [w * d.scale * d.up.float() for w, d in terms]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def merge_module(terms: list[tuple[float, object]], rank: int | None) -> tuple[LowRank, float, float]:
    part, module = terms[0][1].part, terms[0][1].module
    pair = _concatenated(terms)
    if pair is not None and rank is None:  # exact: the ranks side by side, scale 1
        up, down = pair
        return LowRank(part, module, up, down, float(down.shape[0])), 0.0, 0.0  # nothing discarded
    if pair is not None:
        up, down = pair
        u, s, vh = svd_of_product(up, down)
        shape = (up.shape[0], *down.shape[1:])
    else:
        full = sum(w * d.delta() for w, d in terms)
        u, s, vh = svd(full)
        shape = full.shape
    f = truncate(u, s, vh, shape if len(shape) == 4 else (u.shape[0], vh.shape[1]), RankRule(rank))
    return LowRank(part, module, f.up, f.down, float(f.rank)), f.kept, f.total


def merged_metadata(loras: list[LoraDeltas], weights: list[Weight]) -> dict[str, str]:
    """What a merged file says of its sources: their names, weights and hashes; their tag clouds and triggers."""
    tags: dict[str, dict[str, int]] = {}
    triggers = []
    for lora in loras:
        try:
            for folder, counts in json.loads(lora.metadata.get("ss_tag_frequency", "{}")).items():
                mine = tags.setdefault(folder, {})
                for tag, n in counts.items():
                    mine[tag] = mine.get(tag, 0) + n
        except (json.JSONDecodeError, AttributeError):
            pass  # a malformed tag cloud in a downloaded file is only left out
        phrase = lora.metadata.get("modelspec.trigger_phrase")
        if phrase and phrase not in triggers:
            triggers.append(phrase)
    sources = [{"file": lora.path.name, "weight": w, "sshs_model_hash": lora.metadata.get("sshs_model_hash", "")}
               for lora, w in zip(loras, weights)]
    meta = {"lora_studio.merged_from": json.dumps(sources)}
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    return meta


def merge(inputs: list[tuple[str | Path, Weight]], out: str | Path, rank: int | None = None, overwrite: bool = False,
          progress: Progress | None = None) -> ToolResult:
    if not inputs:
        raise ToolError("merge needs at least one LoRA: FILE[:WEIGHT] …")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank {rank}: give a whole number ≥ 1, or leave it out for an exact merge")
    paths = [Path(p) for p, _ in inputs]
    out = check_output(out, paths, overwrite)
    loras = [load_deltas(p) for p in paths]
    family = common_family(loras)
    weights = [w for _, w in inputs]
    modules: dict[tuple[str, str], list] = {}
    for lora, weight in zip(loras, weights):
        for d in lora.deltas:
            w = part_weight(weight, d.part)
            if w != 0:
                modules.setdefault((d.part, d.module), []).append((w, d))
    entries, kept, total = [], {}, {}
    for i, terms in enumerate(modules.values()):
        entry, k, t = merge_module(terms, rank)
        entries.append(entry)
        kept[entry.part] = kept.get(entry.part, 0.0) + k
        total[entry.part] = total.get(entry.part, 0.0) + t
        if progress and i % 16 == 0:
            progress(i / len(modules), f"module {i + 1} of {len(modules)}")
    dtype = torch.float32 if any(lora.dtype == torch.float32 for lora in loras) else torch.float16
    what = " + ".join(f"{p.name}×{weight_text(w)}" for p, w in zip(paths, weights))
    comment = f"merge of {what}" + (f", rank {rank}" if rank else ", exact (ranks concatenated)")
    meta = lora_metadata(out, family, entries, loras[0].metadata if len(loras) == 1 else None, comment,
                         merged_metadata(loras, weights))
    write_lora(out, entries, family, dtype, meta)
    return ToolResult(out, [f"wrote {out}: {comment}", *part_lines(entries, kept, total)])
