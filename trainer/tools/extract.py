"""`python -m trainer extract`: a LoRA from the difference of two checkpoints of one family (what kohya's
extract_lora_from_models does): for every module a LoRA trains (network.py's targets), the best rank-R
approximation of W_tuned − W_base, UNet and text encoders. A part whose weights are identical in both is left out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.network import text_target_names, unet_target_names

from .lowrank import RankRule, svd, truncate
from .output import LowRank, Progress, ToolError, ToolResult, check_output, lora_metadata, part_lines, write_lora


def _parts(model) -> dict[str, torch.nn.Module]:
    parts = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    if len(model.text_encoders) > 1:
        parts["text_encoder_2"] = model.text_encoders[1]
    return parts


def _targets(part: str, module: torch.nn.Module) -> list[str]:
    return unet_target_names(module) if part == "unet" else text_target_names(module)


def extract(base_model: str | Path, tuned: str | Path, out: str | Path, rank: int, overwrite: bool = False,
            dtype: torch.dtype = torch.float16, config_dir: str | Path | None = None,
            progress: Progress | None = None) -> ToolResult:
    """`config_dir`: configs for single-file checkpoints of tiny test models (trainer.models.load_base_model)."""
    from trainer.models import load_base_model

    if rank is None or rank < 1:
        raise ToolError(f"--rank {rank}: give a whole number ≥ 1, e.g. --rank 32")
    out = check_output(out, [base_model, tuned], overwrite)
    if progress:
        progress(0.0, "loading both models")
    a = load_base_model(base_model, config_dir=config_dir)
    b = load_base_model(tuned, config_dir=config_dir)
    if a.family.arch != b.family.arch:
        raise ToolError(f"{Path(tuned).name} is {b.family.name} but {Path(base_model).name} is {a.family.name}: "
                        f"extract from two checkpoints of the same family")
    rule = RankRule(rank)
    entries, kept, total, lines = [], {}, {}, []
    parts_a, parts_b = _parts(a), _parts(b)
    names = {part: _targets(part, m) for part, m in parts_a.items()}
    count, done = sum(len(v) for v in names.values()), 0
    for part, modules in names.items():
        mine = []
        for name in modules:
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
            f = truncate(*svd(diff), diff.shape, rule)
            mine.append(LowRank(part, name, f.up, f.down, float(f.rank)))
            kept[part] = kept.get(part, 0.0) + f.kept
            total[part] = total.get(part, 0.0) + f.total
        if mine:
            entries += mine
        else:
            lines.append(f"{part}: identical in both models, left out")
    if not entries:
        raise ToolError(f"{Path(tuned).name} and {Path(base_model).name} have the same weights in every module a "
                        f"LoRA trains: there is nothing to extract")
    comment = f"extracted from {Path(tuned).name} minus {Path(base_model).name}, rank {rank}"
    meta = lora_metadata(out, a.family.name, entries, {"ss_sd_model_name": Path(base_model).stem}, comment)
    write_lora(out, entries, a.family.name, dtype, meta)
    return ToolResult(out, [f"wrote {out}: {comment}", *part_lines(entries, kept, total), *lines])
