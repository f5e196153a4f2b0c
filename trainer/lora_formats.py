"""Reading every common LoRA file format into one description: which module, which algorithm, which tensors, which scale.

    lora = read_lora(path)                       # LoraFile: format, algorithm, family, rank, alpha, entries
    for d in module_deltas(lora, {"unet": unet, "text_encoder": te}):
        d.part, d.module, d.delta()              # ΔW at weight 1.0, float32, the module's weight shape

Formats (../shared/formats.md): kohya LoRA / LoCon (`lora_unet_…`, `lora_te_…`, `lora_te1_/lora_te2_`, diffusers or
LDM `input_blocks` names, `lora_mid` Tucker), LyCORIS LoHa (`hada_…`) and LoKr (`lokr_…`), diffusers
(`unet.<path>.lora_A.weight`, the older `.lora.down` and attention-processor `…processor.to_q_lora.down` layouts;
alpha from the header's `lora_adapter_metadata`), PEFT (`base_model.model.<path>.lora_A[.default].weight`, with
`adapter_config.json` beside the file when present). Anything else gets one line naming what it is.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora_algorithms import REQUIRED, Entry, default_scale
from .families import detect_lora_family
from . import lora_file
from .lora_file import LoraFileError
from .lora_targets import ModuleDelta, module_deltas  # noqa: F401 - part of this module's API

__all__ = ["LoraFile", "ModuleDelta", "LoraFormatError", "read_lora", "module_deltas"]

PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
# leaf of a key → role in lora_algorithms (kohya / LyCORIS names; the LyCORIS roles keep their own names)
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
               **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
# diffusers / PEFT key endings → (role, how the module path ends): "to_q" etc. are the attention-processor layout's
PATH_ROLES = re.compile(r"^(?P<path>.+?)\.(?:(?P<peft>lora_[AB])(?:\.[^.]+)?\.weight|lora(?:_linear_layer)?\.(?P<old>down|up)"
                        r"\.weight|processor\.(?P<proc>to_q|to_k|to_v|to_out)_lora\.(?P<pdir>down|up)\.weight"
                        r"|(?P<te_old>to_q|to_k|to_v|to_out)_lora\.(?P<tdir>down|up)\.weight|(?P<alpha>alpha))$")
TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
UNET_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}

# Formats we recognise but do not read: a pattern found in one of its keys → what to call the file.
UNSUPPORTED = ((r"dora_scale|lora_magnitude_vector", "a DoRA (weight-decomposed LoRA) file"),
               (r"oft_blocks|oft_diag|\.oft_r\b", "an OFT file"), (r"boft_", "a BOFT file"), (r"ia3_l", "an IA3 file"),
               (r"^base_model\.model\..*\.(hada|lokr)_", "a PEFT LoHa/LoKr file"),
               (r"\.[ab][12]\.weight$", "a GLoRA file"), (r"\.diff(_b)?$", "a full-difference (LyCORIS 'full') file"),
               (r"\.[wb]_norm$", "a LyCORIS norm-layer file"),
               (r"^bundle_emb\.", "a LoRA with bundled textual-inversion embeddings"),
               (r"lora_embedding_[AB]", "a PEFT file with embedding-layer adapters"))
NOT_A_LORA = (("model.diffusion_model.", "a full Stable Diffusion checkpoint: put it in models/Stable-diffusion"),
              ("conditioner.embedders.", "a full SDXL checkpoint: put it in models/Stable-diffusion"),
              ("control_model.", "a ControlNet model"), ("emb_params", "a textual-inversion embedding"),
              ("string_to_param", "a textual-inversion embedding"), ("clip_g", "an SDXL textual-inversion embedding"),
              ("decoder.conv_in.weight", "a VAE"))


class LoraFormatError(LoraFileError):
    """A file that is not a LoRA we read; the message (one line) names the file and what it is."""


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya-lora" | "locon" | "loha" | "lokr" | "diffusers" | "peft"
    algorithm: str  # "lora" | "locon" (convolutions beyond 1×1) | "tucker" (LoCon with lora_mid) | "loha" | "lokr"
    tucker: bool  # any Tucker core (lora_mid, hada_t1/t2, lokr_t2)
    family: str  # "sd1" | "sd2" | "sdxl" | "unknown"
    metadata: dict[str, str]
    rank: int | None  # None when ranks differ between modules or the format has none (full LoKr)
    alpha: float | None  # None when absent (scale 1.0) or different between modules
    entries: list[Entry] = field(default_factory=list)
    dtype: str = ""
    ranks: dict[int, int] = field(default_factory=dict)  # rank → modules
    n_tensors: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    def modules_per_part(self) -> dict[str, int]:
        return dict(Counter(e.part or _guess_part(e.name) for e in self.entries))


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    tensors, metadata = lora_file.read_lora(path)
    _refuse_unsupported(path, tensors)
    keys = list(tensors)
    if any(k.startswith(tuple(KOHYA_PARTS)) for k in keys):
        fmt, entries = "kohya", _kohya_entries(path, tensors)
    elif any(k.startswith("base_model.model.") for k in keys):
        fmt, entries = "peft", _path_entries(path, tensors, "base_model.model.")
        config = _adapter_config(path)
        for entry in entries:  # PEFT saves one model per file; a folder named after the part says which
            entry.part = path.parent.name if path.parent.name in PARTS else None
            _apply_peft_config(entry, config)
    elif any(PATH_ROLES.match(k) for k in keys):
        fmt, entries = "diffusers", _path_entries(path, tensors, "")
        configs = _diffusers_metadata(path, metadata)
        for entry in entries:
            _apply_peft_config(entry, configs.get(entry.part))
    else:
        raise LoraFormatError(f"{path.name} holds no LoRA weights we know (first key: {keys[0] if keys else 'none'}): "
                              "it is not a LoRA, or a format LoRA Studio does not read")
    algorithms = {e.algorithm for e in entries}
    convs = any(e.algorithm == "lora" and e.tensors["down"].dim() == 4 and e.tensors["down"].shape[2:] != (1, 1)
                for e in entries)
    algorithm = next((a for a in ("lokr", "loha", "tucker") if a in algorithms), "locon" if convs else "lora")
    if fmt == "kohya":
        fmt = {"lora": "kohya-lora", "tucker": "locon"}.get(algorithm, algorithm)
    tucker = any(role in e.tensors for e in entries for role in ("mid", "hada_t1", "hada_t2", "lokr_t2"))
    ranks = Counter(e.rank for e in entries if e.rank is not None)
    alphas = {e.alpha for e in entries}
    first = next(iter(entries[0].tensors.values()))  # a weight, not a float32 alpha
    return LoraFile(path=path, format=fmt, algorithm=algorithm, tucker=tucker,
                    family=detect_lora_family(entries, metadata), metadata=metadata,
                    rank=next(iter(ranks)) if len(ranks) == 1 else None,
                    alpha=alphas.pop() if len(alphas) == 1 else None, entries=entries,
                    dtype=str(first.dtype).replace("torch.", ""), ranks=dict(ranks), n_tensors=len(tensors))


def _refuse_unsupported(path: Path, tensors: dict) -> None:
    keys = list(tensors)
    if not keys:
        raise LoraFormatError(f"{path.name} holds no tensors: it is not a LoRA")
    for marker, what in NOT_A_LORA:
        if any(marker in k for k in keys) and not any(k.startswith(tuple(KOHYA_PARTS)) for k in keys):
            raise LoraFormatError(f"{path.name} is {what}, not a LoRA")
    for pattern, what in UNSUPPORTED:
        if any(re.search(pattern, k) for k in keys):
            raise LoraFormatError(f"{path.name} is {what}, which LoRA Studio does not read (only LoRA, LoCon, "
                                  "LoHa and LoKr); convert it to a plain LoRA with the tool that made it")


def _kohya_entries(path: Path, tensors: dict[str, torch.Tensor]) -> list[Entry]:
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        name, _, leaf = key.partition(".")
        role = KOHYA_ROLES.get(leaf)
        part = next((p for prefix, p in KOHYA_PARTS.items() if name.startswith(prefix)), None)
        if role is None or part is None:
            raise LoraFormatError(f"{path.name}: the key {key!r} is not part of a LoRA, LoCon, LoHa or LoKr file; "
                                  "the file is damaged or a format LoRA Studio does not read")
        groups.setdefault(name, {})[role] = (key, t)
    return [_entry(path, name, next(p for prefix, p in KOHYA_PARTS.items() if name.startswith(prefix)), found)
            for name, found in groups.items()]


def _entry(path: Path, name: str, part: str | None, found: dict[str, tuple[str, torch.Tensor]]) -> Entry:
    roles = set(found)
    algorithm = ("lokr" if any(r.startswith("lokr_") for r in roles) else "loha" if any(r.startswith("hada_") for r in roles)
                 else "tucker" if "mid" in roles else "lora")
    missing = [need for need in REQUIRED[algorithm] if not any(alt in roles for alt in need.split("|"))]
    for i in ("1", "2"):  # a factorised LoKr factor needs both halves
        if algorithm == "lokr" and f"lokr_w{i}_a" in roles and f"lokr_w{i}_b" not in roles:
            missing.append(f"lokr_w{i}_b")
    if missing:
        keys = ", ".join(k for k, _ in found.values())
        raise LoraFormatError(f"{path.name}: module {name} has {keys} but no {missing[0]}: the file is damaged "
                              "or incomplete; re-download or re-export it")
    alpha = found.pop("alpha", (None, None))[1]
    entry = Entry(name=name, part=part, algorithm=algorithm, tensors={r: t for r, (_, t) in found.items()},
                  keys=[k for k, _ in found.values()], alpha=None if alpha is None else float(alpha))
    entry.scale = default_scale(entry)
    return entry


def _path_entries(path: Path, tensors: dict[str, torch.Tensor], strip: str) -> list[Entry]:
    """diffusers (`unet.<path>…`, `text_encoder.…`, or no prefix in the oldest files) and PEFT (`base_model.model.`)."""
    groups: dict[tuple[str | None, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = PATH_ROLES.match(key.removeprefix(strip))
        if not m:
            raise LoraFormatError(f"{path.name}: the key {key!r} is not part of a diffusers or PEFT LoRA; the file "
                                  "is damaged or a format LoRA Studio does not read")
        module = m["path"]
        part = None
        if not strip:  # diffusers names the part; its oldest files hold UNet keys without a prefix
            part = next((p for p in reversed(PARTS) if module.startswith(p + ".")), "unet")
            module = module.removeprefix(part + ".")
        if m["peft"]:
            role = "down" if m["peft"] == "lora_A" else "up"
        elif m["alpha"]:
            role = "alpha"
        else:
            role = m["old"] or m["pdir"] or m["tdir"]
            old = m["proc"] or m["te_old"]
            if old:
                renames = UNET_PROCESSOR if part in (None, "unet") else TE_PROCESSOR
                module = f"{module}.{renames[old]}"
        groups.setdefault((part, module), {})[role] = (key, t)
    return [_entry(path, module, part, found) for (part, module), found in groups.items()]


def _guess_part(module: str) -> str:
    """For counting only (PEFT files do not name the model part): CLIP's layers vs everything else."""
    return "text_encoder" if ("encoder.layers." in module or module.startswith("text_model")) else "unet"


def _adapter_config(path: Path) -> dict | None:
    """PEFT's adapter_config.json beside the file; None without one (then scale 1.0, as PEFT's default r = alpha)."""
    config_file = path.with_name("adapter_config.json")
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraFileError(f"{config_file}: cannot read this PEFT config ({e}); fix or remove it") from e
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise LoraFormatError(f"{path.name} is a PEFT {kind} adapter, which LoRA Studio does not read (only LoRA)")
    return config


def _diffusers_metadata(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: one PEFT LoraConfig per part, keys prefixed "unet." etc."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        packed = json.loads(text)
    except ValueError as e:
        raise LoraFileError(f"{path.name}: its lora_adapter_metadata header is not JSON ({e}); re-export it") from e
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    for part, config in configs.items():
        if config.get("use_dora"):
            raise LoraFormatError(f"{path.name} is a DoRA file (use_dora in its {part} config), which LoRA Studio "
                                  "does not read (only LoRA)")
    return configs


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path it ends (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _apply_peft_config(entry: Entry, config: dict | None) -> None:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / √r with rsLoRA, r and alpha per module through
    rank_pattern / alpha_pattern. Without a config, or with a stored `.alpha` tensor (rare), the kohya rule stays."""
    if not config or entry.alpha is not None:
        return
    r = _pattern_value(config.get("rank_pattern"), entry.name, config.get("r", entry.rank))
    alpha = float(_pattern_value(config.get("alpha_pattern"), entry.name, config.get("lora_alpha", r)))
    entry.alpha = alpha
    entry.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
