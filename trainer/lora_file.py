"""LoRA files: kohya key conversion, atomic save with metadata, reading and inspecting files from anywhere.

The kohya ("networks.lora") format is what AUTOMATIC1111, ComfyUI and diffusers all load (../shared/formats.md):
`<prefix><module path with "." → "_">.{lora_down.weight, lora_up.weight, alpha}`, alpha a 0-dim float32 tensor.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from .atomic import write_bytes
from .errors import StudioError

# Keys a plain-LoRA kohya file must never hold: diffusers raises on them (formats.md, "Pitfalls").
FORBIDDEN_KEY_PARTS = ("lora_A", "lora_B", "lora_mid", "dora_scale", "bundle_emb", "text_projection")


class LoraFileError(StudioError):
    """A LoRA file that cannot be read or used; the message names the file."""


def text_encoder_prefixes(n_encoders: int) -> list[str]:
    # SDXL needs te1/te2: A1111 silently ignores `lora_te_` on SDXL.
    return ["lora_te_"] if n_encoders == 1 else ["lora_te1_", "lora_te2_"]


def kohya_module_name(prefix: str, module_path: str) -> str:
    """`encoder.layers.0.self_attn.q_proj` → `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.

    transformers 5 dropped the `text_model.` level from CLIPTextModel's paths, but A1111 and ComfyUI only match
    the long form, so text-encoder names always carry `text_model_`.
    """
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


def module_alpha(down: torch.Tensor, alpha: float, conv_alpha: float | None) -> float:
    """A module's alpha from its down weight: `conv_alpha` for a 3x3 convolution (LoCon), told apart by its kernel;
    `alpha` for the rest (and for all when conv_alpha is None)."""
    is_3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    return float(conv_alpha if is_3x3 and conv_alpha is not None else alpha)


def to_kohya(parts: dict[str, dict[str, torch.Tensor]], alpha: float, dtype: torch.dtype = torch.float16,
             conv_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """PEFT states (`{prefix: {"<path>.lora_A.weight": …}}`) → one kohya state dict. `conv_alpha`: the alpha of
    3x3 convolutions (LoCon's conv_alpha; module_alpha); None = `alpha` for all."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in parts.items():
        for key, tensor in state.items():
            path, kind = key.rsplit(".lora_", 1)
            name = kohya_module_name(prefix, path)
            role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            out[f"{name}.{role}"] = tensor.detach().to("cpu", dtype).contiguous()
            if role == "lora_down.weight":
                out[f"{name}.alpha"] = torch.tensor(module_alpha(tensor, alpha, conv_alpha), dtype=torch.float32)
    return out


def to_diffusers(parts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states (`{"unet"|"text_encoder"|"text_encoder_2": {...}}`) → diffusers' `unet.<path>.lora_A.weight` layout."""
    return {f"{component}.{key}": t.detach().to("cpu", dtype).contiguous()
            for component, state in parts.items() for key, t in state.items()}


def diffusers_metadata(parts: dict[str, dict[str, torch.Tensor]], alpha: float,
                       conv_alpha: float | None = None) -> str:
    """diffusers' `lora_adapter_metadata` header for a to_diffusers file: per part the PEFT LoraConfig (keys
    "unet.r", "unet.lora_alpha", …). Without it diffusers takes alpha = r, so a LoRA trained at alpha 4, rank 8
    would load twice as strong as trained. Ranks and alphas that differ from the part's commonest (LoCon's 3x3
    convolutions: conv_rank, conv_alpha) go into rank_pattern / alpha_pattern by module path."""
    packed: dict = {}
    for part, state in parts.items():
        downs = {key[:-len(".lora_A.weight")]: t for key, t in state.items() if key.endswith(".lora_A.weight")}
        if not downs:
            continue
        ranks = {path: t.shape[0] for path, t in downs.items()}
        alphas = {path: module_alpha(t, alpha, conv_alpha) for path, t in downs.items()}
        r, a = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        config = {"r": r, "lora_alpha": a, "target_modules": sorted(downs),
                  "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
                  "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != a},
                  "lora_dropout": 0.0, "bias": "none", "use_dora": False, "init_lora_weights": True}
        packed.update({f"{part}.{k}": v for k, v in config.items()})
    return json.dumps(packed)


def tensor_hash(data: bytes) -> str:
    """sha256 of the bytes after the safetensors header: A1111's `sshs_model_hash`, unchanged by metadata edits."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically (atomic.py): a crash never leaves half a file."""
    path = Path(path)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    assert not bad, f"safetensors metadata must be str→str: {bad}"
    metadata = dict(metadata)
    metadata["sshs_model_hash"] = tensor_hash(save_bytes(tensors, metadata=metadata))
    return write_bytes(path, save_bytes(tensors, metadata=metadata))


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged header
        raise LoraFileError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from e


def inspect_lora(path: str | Path) -> dict:
    """What a user wants to know about a LoRA file: format, algorithm, family, rank, alpha, module counts per part
    (kohya's part names: unet, te, or te1/te2 on SDXL), metadata. A file we do not read raises one line saying what
    it is (lora_formats.LoraFormatError)."""
    from .lora_formats import read_lora as read_any  # lora_formats builds on this module

    lora = read_any(path)
    sdxl = lora.family == "sdxl" or any(e.part == "text_encoder_2" for e in lora.entries)
    labels = {"unet": "unet", "text_encoder": "te1" if sdxl else "te", "text_encoder_2": "te2"}
    tensors = {k: t for e in lora.entries for k, t in zip(e.keys, e.tensors.values())}
    return {
        "path": str(path),
        "format": lora.format,
        "algorithm": lora.algorithm,
        "tucker": lora.tucker,
        "family": lora.family,
        "rank": lora.rank,  # None when modules differ: then "ranks" counts modules per rank
        "ranks": {str(r): n for r, n in sorted(lora.ranks.items())},
        "alpha": lora.alpha,  # None when the file has none (scale 1.0) or alphas differ: then "alphas" counts them
        "alphas": {str(a): n for a, n in Counter(e.alpha for e in lora.entries).most_common()},
        "modules": {labels[p]: n for p, n in sorted(lora.modules_per_part().items())},
        "tensors": lora.n_tensors,
        "dtype": lora.dtype,
        "metadata": lora.metadata,
        "trigger_words": trigger_words(lora.metadata),
        "non_finite": non_finite_keys(tensors),
    }


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of tensors holding NaN or ±inf: a diverged run's file, which would draw black pictures."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """The trigger phrase when the file names one; else the tags in at least half of the training captions (a
    trigger word is in all of them; a caption's own description is in a few), at most five, commonest first;
    else, for captions written as sentences, their coined subject word (captions.coined_words)."""
    if metadata.get("modelspec.trigger_phrase"):
        return [metadata["modelspec.trigger_phrase"]]
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
        dirs = json.loads(metadata.get("ss_dataset_dirs", "{}"))
    except json.JSONDecodeError:
        return []
    tags: Counter[str] = Counter()
    images = 0
    for folder, counts in freq.items():
        tags.update(counts)
        known = dirs.get(folder, {}).get("img_count") if isinstance(dirs.get(folder), dict) else None
        images += known or max(counts.values(), default=0)  # without a count: the commonest tag's is a floor
    common = [t for t, n in tags.most_common() if 2 * n >= images][:5]
    if common or not images:
        return common
    from .data.captions import coined_words  # the tokenizer loads on first use only
    return coined_words(tags, images)[:3]
