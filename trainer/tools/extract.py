"""`python -m trainer extract`: a LoRA from the difference of two checkpoints of one family (what kohya's
extract_lora_from_models does): for every module a LoRA trains (network.py's targets), the best rank-R
approximation of W_tuned − W_base, UNet and text encoders. A part whose weights are identical in both is left out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.network import conv_target_names, text_target_names, unet_target_names

from .lowrank import RankRule, svd, truncate
from .output import LowRank, Progress, ToolError, ToolResult, check_output, lora_metadata, part_lines, write_lora


def _parts(model) -> dict[str, torch.nn.Module]:
    parts = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    if len(model.text_encoders) > 1:
        parts["text_encoder_2"] = model.text_encoders[1]
    return parts


def _targets(part: str, model: torch.nn.Module, rank: int, conv_rank: int | None) -> dict[str, int]:
    """module path → rank to extract it at: the trainer's targets (with conv_rank, its LoCon ones: 3×3 convolutions
    at the conv rank, the resnets' Linear and 1×1 layers at the rank)."""
    if part != "unet":
        return {n: rank for n in text_target_names(model)}
    names = unet_target_names(model, conv=bool(conv_rank))
    wide = set(conv_target_names(model, names))
    return {n: conv_rank if n in wide else rank for n in names}


def _untouched_changes(part: str, a: torch.nn.Module, b: torch.nn.Module, targets: dict[str, int]) -> str | None:
    """A line naming how many other layers differ between the models: a LoRA of these targets leaves them out."""
    others = [n for n, m in a.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and n not in targets and not torch.equal(m.weight, b.get_submodule(n).weight)]
    if not others:
        return None
    hint = " (add --conv-rank R to take the UNet's resnet convolutions as LoCon)" if part == "unet" else ""
    return (f"{part}: {len(others)} other layers differ and are not in the LoRA, e.g. {others[0]}{hint}")


def extract(base_model: str | Path, tuned: str | Path, out: str | Path, rank: int, overwrite: bool = False,
            dtype: torch.dtype = torch.float16, config_dir: str | Path | None = None,
            progress: Progress | None = None, conv_rank: int | None = None) -> ToolResult:
    """`config_dir`: configs for single-file checkpoints of tiny test models (trainer.models.load_base_model).
    `conv_rank`: also the UNet's resnet and resampler layers, 3×3 convolutions at this rank (a LoCon)."""
    from trainer.models import load_base_model

    for flag, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if (value is None and flag == "--rank") or (value is not None and value < 1):
            raise ToolError(f"{flag} {value}: give a whole number ≥ 1, e.g. {flag} 32")
    out = check_output(out, [base_model, tuned], overwrite)
    if progress:
        progress(0.0, "loading both models")
    a = load_base_model(base_model, config_dir=config_dir)
    b = load_base_model(tuned, config_dir=config_dir)
    if a.family.arch != b.family.arch:
        raise ToolError(f"{Path(tuned).name} is {b.family.name} but {Path(base_model).name} is {a.family.name}: "
                        f"extract from two checkpoints of the same family")
    entries, kept, total, lines, untouched = [], {}, {}, [], []
    parts_a, parts_b = _parts(a), _parts(b)
    targets = {part: _targets(part, m, rank, conv_rank) for part, m in parts_a.items()}
    count, done = sum(len(v) for v in targets.values()), 0
    for part, modules in targets.items():
        mine = []
        for name, module_rank in modules.items():
            wa = parts_a[part].get_submodule(name).weight
            wb = parts_b[part].get_submodule(name).weight
            if wa.shape != wb.shape:
                raise ToolError(f"{Path(tuned).name}: {part} {name} has shape {tuple(wb.shape)} but "
                                f"{tuple(wa.shape)} in {Path(base_model).name}: not two versions of one model")
            diff = wb.float() - wa.float()
            done += 1
            if progress and done % 16 == 0:
                progress(0.1 + 0.85 * done / count, f"SVD of module {done} of {count}")
            if not diff.any():
                continue
            f = truncate(*svd(diff), diff.shape, RankRule(module_rank))
            mine.append(LowRank(part, name, f.up, f.down, float(f.rank)))
            kept[part] = kept.get(part, 0.0) + f.kept
            total[part] = total.get(part, 0.0) + f.total
        entries += mine
        if not mine:
            lines.append(f"{part}: identical in both models, left out")
        others = _untouched_changes(part, parts_a[part], parts_b[part], modules)
        untouched += [others] if others else []
    if not entries:
        raise ToolError(f"{Path(tuned).name} and {Path(base_model).name} have the same weights in every module a "
                        f"LoRA trains: " + ("; ".join(untouched) if untouched else "there is nothing to extract"))
    lines += untouched
    comment = f"extracted from {Path(tuned).name} minus {Path(base_model).name}, rank {rank}" + (
        f", convolutions rank {conv_rank}" if conv_rank else "")
    meta = lora_metadata(out, a.family.name, entries, {"ss_sd_model_name": Path(base_model).stem}, comment)
    write_lora(out, entries, a.family.name, dtype, meta)
    return ToolResult(out, [f"wrote {out}: {comment}", *part_lines(entries, kept, total), *lines])
