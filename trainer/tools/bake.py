"""`python -m trainer bake`: a new base model with a LoRA mix merged into its weights, W' = W + Σ w_i · ΔW_i.

Two outputs:
- a single .safetensors file in the same layout as a single-file base (same keys, shapes and dtypes; only the
  patched tensors differ), which our loader, diffusers' from_single_file, A1111 and ComfyUI read;
- otherwise a diffusers folder, its weights stored in the base's precision.
Each patched weight gets Σ w·ΔW computed in float32 and is rounded once to its own dtype. The output appears only
when complete: written under a temporary name in the same folder, then renamed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from trainer.atomic import atomic_path, fsync_dir, fsync_file, temp_path
from trainer.families import detect_family, resolve_path
from trainer.weights import read_cast

from .ldm_layout import unet_config, weight_views
from .output import Progress, ToolError, ToolResult, check_output
from .source import LoraDeltas, Weight, load_deltas, part_weight, skeleton, weight_text

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "model_configs"


def _summed(loras: list[tuple[LoraDeltas, Weight]]) -> dict[tuple[str, str], torch.Tensor]:
    total: dict[tuple[str, str], torch.Tensor] = {}
    for lora, weight in loras:
        for d in lora.deltas:
            key = (d.part, d.module)
            total[key] = total.get(key, 0) + part_weight(weight, d.part) * d.delta()
    return total


def _patch(weight: torch.Tensor, delta: torch.Tensor, where: str) -> None:
    if weight.numel() != delta.numel():
        raise ToolError(f"{where}: the LoRA's delta has shape {tuple(delta.shape)} but the base weight is "
                        f"{tuple(weight.shape)}: the LoRA was made for another model")
    weight.copy_((weight.float() + delta.reshape(weight.shape)).to(weight.dtype))  # one rounding


def _atomic_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place, its files on the disk first (atomic.py's rule, for a folder); an existing
    one (overwrite asked) is set aside first, then removed."""
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    old = temp_path(out)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def bake_single_file(base: Path, mix: list[tuple[Path, Weight]], out: Path, config_dir: Path | None,
                     progress: Progress | None) -> tuple[list[tuple[LoraDeltas, Weight]], list[str]]:
    from safetensors.torch import save_file

    fam = detect_family(base)
    loras = [(load_deltas(p, skeleton(fam.name, config_dir), (base.name, fam.arch)), w) for p, w in mix]
    deltas = _summed(loras)
    state, metadata = read_cast(base, None)  # ordinary memory, writable: patched in place
    views = weight_views(state, fam.arch, unet_config(config_dir or MODEL_CONFIGS_DIR / fam.name))
    for i, ((part, module), delta) in enumerate(deltas.items()):
        view = views.get(part, {}).get(module)
        if view is None:
            raise ToolError(f"{base.name} has no weight for the LoRA's {part} module {module} in its layout: bake "
                            f"into a diffusers folder instead (an output name without .safetensors)")
        _patch(view, delta, f"{base.name}: {part} {module}")
        if progress and i % 32 == 0:
            progress(0.2 + 0.6 * i / len(deltas), f"patching {i + 1} of {len(deltas)} weights")
    metadata = dict(metadata)
    # each weight is one number or [UNet, text encoders]
    metadata["lora_studio.baked"] = json.dumps([{"file": lora.path.name, "weight": w} for lora, w in loras])
    if progress:
        progress(0.85, f"writing {out.name}")
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return loras, [f"{len(deltas)} weights patched; every other tensor, key, shape and dtype as in {base.name}"]


def _stored_dtype(base: Path) -> torch.dtype:
    """The precision the base's UNet is stored in (fp16 files stay fp16 once baked); a pickled .ckpt: float32."""
    from trainer.weights import DTYPES, read_header

    if base.is_file() and base.suffix.lower() != ".safetensors":
        return torch.float32
    files = [base] if base.is_file() else sorted((base / "unet").glob("*.safetensors"))
    for f in files:
        entries, _, _ = read_header(f)
        for name, e in entries.items():
            if ("diffusion_model" in name or base.is_dir()) and DTYPES.get(e["dtype"], torch.float32).is_floating_point:
                return DTYPES[e["dtype"]]
    return torch.float32


def bake_folder(base: Path, mix: list[tuple[Path, Weight]], out: Path, config_dir: Path | None,
                progress: Progress | None) -> tuple[list[tuple[LoraDeltas, Weight]], list[str]]:
    from trainer.models import load_base_model

    model = load_base_model(base, config_dir=config_dir)  # float32: the sums are exact before one rounding
    fam = model.family
    parts = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
    if len(model.text_encoders) > 1:
        parts["text_encoder_2"] = model.text_encoders[1]
    loras = [(load_deltas(p, parts, (base.name, fam.arch)), w) for p, w in mix]
    deltas = _summed(loras)
    with torch.no_grad():
        for (part, module), delta in deltas.items():
            _patch(parts[part].get_submodule(module).weight, delta, f"{base.name}: {part} {module}")
    dtype = _stored_dtype(base)
    tmp = temp_path(out)
    configs = base if base.is_dir() else (config_dir or MODEL_CONFIGS_DIR / fam.name)
    if progress:
        progress(0.6, f"writing {out.name}")
    try:
        _write_folder(model, dtype, configs, tmp)
        _atomic_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return loras, [f"{len(deltas)} weights patched; a diffusers folder in {str(dtype).removeprefix('torch.')}"]


def _write_folder(model, dtype: torch.dtype, configs: Path, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    shutil.copy2(configs / "model_index.json", tmp / "model_index.json")
    shutil.copytree(configs / "scheduler", tmp / "scheduler")
    def stored(module):  # cast only when needed: diffusers warns on every .to(dtype), even a no-op one
        return module if module.dtype == dtype else module.to(dtype)

    stored(model.unet).save_pretrained(tmp / "unet")
    stored(model.vae).save_pretrained(tmp / "vae")
    for name, te, tok in zip(("text_encoder", "text_encoder_2"), model.text_encoders, model.tokenizers):
        stored(te).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name.replace("text_encoder", "tokenizer"))


def bake(base_model: str | Path, loras: list[tuple[str | Path, Weight]], out: str | Path, overwrite: bool = False,
         config_dir: str | Path | None = None, progress: Progress | None = None) -> ToolResult:
    """`config_dir`: a diffusers folder whose configs describe a single-file base (tests' tiny models)."""
    base = resolve_path(base_model)
    if not loras:
        raise ToolError("bake needs at least one LoRA: --lora FILE[:WEIGHT], repeatable")
    single = str(out).lower().endswith(".safetensors")
    if single and not (base.is_file() and base.suffix.lower() == ".safetensors"):
        raise ToolError(f"--out {out}: a single .safetensors output keeps the layout of a single .safetensors base, "
                        f"and {base.name} is not one; give --out a folder name (a diffusers folder is written)")
    out = check_output(out, [base, *[p for p, _ in loras]], overwrite, suffix=".safetensors" if single else None)
    config_dir = Path(config_dir) if config_dir else None
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0.05, f"reading {base.name}")
    mix = [(Path(p), w) for p, w in loras]
    loaded, lines = (bake_single_file if single else bake_folder)(base, mix, out, config_dir, progress)
    mix = " + ".join(f"{lora.path.name}×{weight_text(w)}" for lora, w in loaded)
    return ToolResult(out, [f"wrote {out}: {base.name} with {mix} merged in", *lines])

