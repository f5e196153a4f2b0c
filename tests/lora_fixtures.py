"""LoRA files of every format, written for a given model from random factors, with the ΔW each must give.

Test helper, independent of trainer/lora_*.py: key names are spelled from the formats' own rules, and each
expected ΔW is computed here in numpy from the format's definition (kohya/PEFT: scale · up @ down; LyCORIS:
Hadamard product of two low-rank products for LoHa, Kronecker product for LoKr, mode products with a core for
Tucker), with scale alpha / rank, 1 without alpha, and PEFT's lora_alpha / r or / √r (rsLoRA).

    expected = write_lora(path, "loha", parts, rank=4, alpha=2.0)   # {(part, module path): ΔW as numpy}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(parts: dict, convs: bool = False, limit: int = 0) -> list[tuple[str, str, torch.nn.Module]]:
    """kohya's default modules (Linear / 1×1 conv in transformer blocks, CLIP layers); with convs also 3×3
    resnet convolutions, conv_in, conv_out and the time embedding (LoCon's extra targets)."""
    out = []
    for part, model in parts.items():
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if part == "unet":
                attention = ".attentions." in name and (isinstance(m, torch.nn.Linear) or m.kernel_size == (1, 1))
                extra = convs and (name in ("conv_in", "conv_out", "time_embedding.linear_1")
                                   or (".resnets." in name and name.endswith(("conv1", "conv2"))))
                if attention or extra:
                    out.append((part, name, m))
            elif ".layers." in name and name.rsplit(".", 1)[-1] in TEXT_TARGETS:
                out.append((part, name, m))
    if limit:  # a spread-out subset (the conv targets sit at both ends of the UNet's list)
        step = max(1, len(out) // limit)
        out = out[::step]
    return out


def kohya_name(part: str, path: str, sdxl: bool = False) -> str:
    if part != "unet" and not path.startswith("text_model."):
        path = "text_model." + path  # kohya's names keep CLIP's text_model level (transformers 5 dropped it)
    return (SDXL_PREFIX if sdxl else KOHYA_PREFIX)[part] + path.replace(".", "_")


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen) * 0.1


def _np(t):
    return t.double().numpy()


def _tucker(core, wa, wb):
    """core [r1, r2, kh, kw], wa [r1, out], wb [r2, in] → Σ_ij core[i,j] wa[i,o] wb[j,c]."""
    c, a, b = _np(core), _np(wa), _np(wb)
    out = np.zeros((a.shape[1], b.shape[1], *c.shape[2:]))
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            out += np.multiply.outer(np.outer(a[i], b[j]), c[i, j])
    return out


def _lora(gen, m, rank, tucker=False):
    w = m.weight
    k = tuple(w.shape[2:])
    if tucker and k != (1, 1) and len(k) == 2:
        down, mid, up = _randn(gen, rank, w.shape[1], 1, 1), _randn(gen, rank, rank, *k), _randn(gen, w.shape[0], rank, 1, 1)
        return {"down": down, "mid": mid, "up": up}, _tucker(mid, up.flatten(1).T, down.flatten(1))
    down = _randn(gen, rank, *w.shape[1:])
    up = _randn(gen, w.shape[0], rank, *[1] * len(k))
    return {"down": down, "up": up}, (_np(up).reshape(w.shape[0], rank) @ _np(down).reshape(rank, -1)).reshape(w.shape)


def _loha(gen, m, rank, tucker=False):
    w = m.weight
    out, k = w.shape[0], tuple(w.shape[2:])
    t, product = {}, np.ones(tuple(w.shape))
    for i in ("1", "2"):
        if tucker and k and k != (1, 1):
            t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"] = (
                _randn(gen, rank, rank, *k), _randn(gen, rank, out), _randn(gen, rank, w.shape[1]))
            product = product * _tucker(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])
        else:
            t[f"hada_w{i}_a"], t[f"hada_w{i}_b"] = _randn(gen, out, rank), _randn(gen, rank, w[0].numel())
            product = product * (_np(t[f"hada_w{i}_a"]) @ _np(t[f"hada_w{i}_b"])).reshape(w.shape)
    return t, product


def _lokr(gen, m, rank, mode):
    """mode: "full" (w1, w2), "factored" (w1_a/b, w2_a/b), "tucker" (w1, t2 with w2_a/b; 3×3 convs only)."""
    w = m.weight
    out, inp, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    a, b = (2 if out % 2 == 0 else 1), (2 if inp % 2 == 0 else 1)
    c, d = out // a, inp // b
    t = {}
    if mode == "factored":
        t["lokr_w1_a"], t["lokr_w1_b"] = _randn(gen, a, rank), _randn(gen, rank, b)
        w1 = _np(t["lokr_w1_a"]) @ _np(t["lokr_w1_b"])
    else:
        t["lokr_w1"] = _randn(gen, a, b)
        w1 = _np(t["lokr_w1"])
    if mode == "tucker" and k and k != (1, 1):
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = _randn(gen, rank, rank, *k), _randn(gen, rank, c), _randn(gen, rank, d)
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    elif mode == "full":
        t["lokr_w2"] = _randn(gen, c, d, *k)
        w2 = _np(t["lokr_w2"])
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = _randn(gen, c, rank), _randn(gen, rank, d, *k)
        w2 = (_np(t["lokr_w2_a"]) @ _np(t["lokr_w2_b"]).reshape(rank, -1)).reshape(c, d, *k)
    # Kronecker product written out: ΔW[i·c + p, j·d + q, …] = w1[i, j] · w2[p, q, …]
    delta = np.zeros(tuple(w.shape))
    for i in range(a):
        for j in range(b):
            delta[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j] * w2
    return t, delta


KOHYA_LEAF = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}


def write_lora(path, kind: str, parts: dict, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
               sdxl_names: str = "", dtype=torch.float32, limit: int = 0, metadata: dict | None = None,
               peft_config: dict | None = None) -> dict:
    """Write a file of `kind` and return {(part, module path): expected ΔW at weight 1}.

    kind: lora | locon | locon-tucker | loha | loha-tucker | lokr-full | lokr-factored | lokr-tucker (kohya/LyCORIS
    keys; sdxl_names "diffusers" or "ldm" for SDXL's lora_te1/te2 and UNet names), diffusers, diffusers-lora-down,
    diffusers-processor, peft / peft-plain (PEFT keys with / without `.default`, for the single part given)."""
    gen = torch.Generator().manual_seed(seed)
    convs = kind in ("locon", "locon-tucker") or kind.startswith(("loha", "lokr"))
    tensors, expected = {}, {}
    configs = {}
    for part, name, m in targets(parts, convs, limit):
        if kind.startswith("loha"):
            t, delta = _loha(gen, m, rank, tucker=kind.endswith("tucker"))
            r = rank
        elif kind.startswith("lokr"):
            t, delta = _lokr(gen, m, rank, kind.split("-")[1])
            r = rank if ("lokr_w1_b" in t or "lokr_w2_b" in t) else None
        else:
            t, delta = _lora(gen, m, rank, tucker=kind == "locon-tucker")
            r = rank
        if kind.startswith(("diffusers", "peft")):
            scale = 1.0
            cfg = (peft_config or {}).get(part) if kind.startswith("diffusers") else peft_config
            if cfg:
                r_m = _pattern(cfg.get("rank_pattern", {}), name, cfg["r"])
                a_m = _pattern(cfg.get("alpha_pattern", {}), name, cfg["lora_alpha"])
                scale = a_m / (math.sqrt(r_m) if cfg.get("use_rslora") else r_m)
            tensors.update(_path_keys(kind, part, name, t, dtype))
        else:
            scale = 1.0 if (alpha is None or r is None) else alpha / r
            prefix_name = _kohya_module(part, name, parts, sdxl_names)
            for role, tensor in t.items():
                tensors[f"{prefix_name}.{KOHYA_LEAF.get(role, role)}"] = tensor.to(dtype)
            if alpha is not None:
                tensors[f"{prefix_name}.alpha"] = torch.tensor(float(alpha))
        expected[(part, name)] = delta * scale
    meta = dict(metadata or {})
    if kind.startswith("diffusers") and peft_config:
        # as diffusers writes it: each part's LoraConfig, target_modules included
        packed = {f"{p}.{k}": v for p, c in peft_config.items() for k, v in c.items()}
        for p in peft_config:
            packed.setdefault(f"{p}.target_modules", sorted(n for q, n in expected if q == p))
        meta["lora_adapter_metadata"] = json.dumps(packed)
    if kind.startswith("peft") and peft_config is not None:
        Path(path).with_name("adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **peft_config}))
    save_file(tensors, str(path), metadata=meta)
    return expected


def _pattern(patterns: dict, name: str, default):
    import re
    return next((v for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?{k}", name)), default)


def _kohya_module(part, name, parts, sdxl_names):
    if sdxl_names == "ldm" and part == "unet":  # the test suite's own LDM naming (original_layout.py)
        key = f"{name}.weight"
        mapping = _ldm_map(parts["unet"])
        return "lora_unet_" + mapping[key].removesuffix(".weight").replace(".", "_")
    return kohya_name(part, name, sdxl=bool(sdxl_names))


_LDM_CACHE: dict[int, dict] = {}


def _ldm_map(unet) -> dict[str, str]:
    """diffusers key → original key, from original_layout.unet_to_original."""
    if id(unet) not in _LDM_CACHE:
        from original_layout import unet_to_original

        original = unet_to_original(unet)  # built key by key in state_dict order
        _LDM_CACHE[id(unet)] = {k: o.removeprefix("model.diffusion_model.")
                                for k, o in zip(unet.state_dict(), original, strict=True)}
    return _LDM_CACHE[id(unet)]


def _path_keys(kind, part, name, t, dtype) -> dict:
    down, up = t["down"].to(dtype), t["up"].to(dtype)
    if kind.startswith("peft"):  # PEFT's own save_pretrained drops the adapter name; some tools keep `.default`
        tag = ".default" if kind == "peft" else ""
        return {f"base_model.model.{name}.lora_A{tag}.weight": down, f"base_model.model.{name}.lora_B{tag}.weight": up}
    if kind == "diffusers-lora-down":
        return {f"{part}.{name}.lora.down.weight": down, f"{part}.{name}.lora.up.weight": up}
    if kind == "diffusers-processor":
        for new, old in (("to_out.0", "to_out"), ("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                         ("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
            if name.endswith("." + new):
                head = name[: -len(new) - 1]
                te_head = head if head.startswith("text_model.") else "text_model." + head
                if part == "unet":
                    return {f"unet.{head}.processor.{old}_lora.down.weight": down,
                            f"unet.{head}.processor.{old}_lora.up.weight": up}
                return {f"{part}.{te_head}.{old}_lora.down.weight": down, f"{part}.{te_head}.{old}_lora.up.weight": up}
        if part == "unet":
            return {f"unet.{name}.lora.down.weight": down, f"unet.{name}.lora.up.weight": up}
        name = name if name.startswith("text_model.") else "text_model." + name
        return {f"{part}.{name}.lora_linear_layer.down.weight": down, f"{part}.{name}.lora_linear_layer.up.weight": up}
    return {f"{part}.{name}.lora_A.weight": down, f"{part}.{name}.lora_B.weight": up}
