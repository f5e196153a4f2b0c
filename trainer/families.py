"""The model families (`FAMILIES`, one table): which one a base model is (`detect_family`, offline) and which one a
LoRA file was trained for (`detect_lora_family`).

Family rules. They use key names, topology and config switches, never widths, so tiny test models with the real
topology are recognised exactly like the real ones.
  diffusers folder:
    sdxl   text_encoder_2 in model_index.json, or unet addition_embed_type == "text_time"
    sd2*   unet use_linear_projection, or text_encoder hidden_act "gelu" (OpenCLIP), or cross_attention_dim 1024;
           sd2-v when scheduler prediction_type is "v_prediction", else sd2
    sd1    otherwise
  single file (the text encoder's layout names the family):
    sdxl   conditioner.embedders.1.model.*   (OpenCLIP-G beside CLIP-L at conditioner.embedders.0.transformer.*)
    sd2*   cond_stage_model.model.*          (OpenCLIP-H)
    sd1    cond_stage_model.transformer.*    (OpenAI CLIP-L)
    SD 2.x weights do not say whether they predict noise (512-base) or v (768-v). In order, the first that
    answers: the `family` argument ("sd2" / "sd2-v"); the scheduler of `config_dir`; A1111's sidecar
    `<name>.yaml` (`parameterization: "v"`); the file's `modelspec.prediction_type` metadata; and last ComfyUI's
    heuristic: std of output_blocks.11.1.transformer_blocks.0.norm1.bias > 0.09 means v (a fresh model reads as
    epsilon, so tests name the family or pass config_dir).
An explicit family decides between sd2 and sd2-v; naming another architecture than the weights hold is an error.
A file whose family cannot be told is an error saying what was seen, unless the family is given explicitly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import PROJECT_ROOT
from .errors import ModelError
from .weights import not_safetensors, read_pickle

DEMO_MODEL_DIR = PROJECT_ROOT / "models" / "demo"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sd2-v", "sdxl"
    prediction_type: str  # what the UNet predicts: "epsilon" (the noise) or "v_prediction"
    base_model_version: str  # kohya's ss_base_model_version, read by A1111 to match LoRAs to models
    architecture: str  # modelspec.architecture of a LoRA trained on this family
    resolution: int  # native training resolution
    is_sdxl: bool

    @property
    def arch(self) -> str:
        """The weight layout: sd2 and sd2-v share one."""
        return "sd2" if self.name.startswith("sd2") else self.name


FAMILIES = {
    "sd1": Family("sd1", "epsilon", "sd_v1", "stable-diffusion-v1/lora", 512, False),
    "sd2": Family("sd2", "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", 512, False),
    "sd2-v": Family("sd2-v", "v_prediction", "sd_v2", "stable-diffusion-v2-768-v/lora", 768, False),
    "sdxl": Family("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024, True),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)} (or 'auto')")
    return FAMILIES[name]


# ---------------------------------------------------------------------------------------------------------------
# Family detection


def resolve_path(path) -> Path:
    path = DEMO_MODEL_DIR if path in ("", None) else Path(path).expanduser()  # "": the built-in demo
    if not path.exists():
        if path == DEMO_MODEL_DIR:
            raise ModelError(f"{path}: the built-in demo model is not installed; build it with "
                             "`python scripts/train_demo_base.py`, or choose a base model (--base-model PATH)")
        raise ModelError(f"{path}: base model not found; pick an existing .safetensors/.ckpt file or diffusers folder")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read this config ({e})") from e


def folder_family(folder: Path) -> Family:
    if not (folder / "model_index.json").is_file():
        files = [p.name for p in sorted(folder.iterdir()) if p.name.lower().endswith(CHECKPOINT_SUFFIXES)]
        hint = f" It holds {len(files)} checkpoint file(s) ({', '.join(files[:3])}): pick one of them." if files else ""
        raise ModelError(f"{folder}: not a diffusers model folder: expected model_index.json with unet/, vae/ and "
                         f"text_encoder/ subfolders, or choose a single .safetensors/.ckpt file instead.{hint}")
    index = _read_json(folder / "model_index.json")
    if not (folder / "unet" / "config.json").is_file():
        raise ModelError(f"{folder}: model_index.json names {index.get('_class_name', 'a pipeline')} without "
                         f"unet/config.json: only Stable Diffusion 1.x, 2.x and SDXL pipelines are supported")
    unet = _read_json(folder / "unet" / "config.json")
    te_file = folder / "text_encoder" / "config.json"
    te = _read_json(te_file) if te_file.is_file() else {}
    sched_file = folder / "scheduler" / "scheduler_config.json"
    prediction = _read_json(sched_file).get("prediction_type", "epsilon") if sched_file.is_file() else "epsilon"
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        name = "sdxl"
    elif unet.get("use_linear_projection") or te.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
        name = "sd2-v" if prediction == "v_prediction" else "sd2"
    else:
        name = "sd1"
    family = FAMILIES[name]
    if family.prediction_type != prediction and family.arch != "sd2":
        raise ModelError(f"{folder}: a {name} model whose scheduler predicts {prediction!r}: only "
                         f"{family.prediction_type} {name} models are supported")
    return family


def _seen(keys) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(prefixes[:8]) + (" …" if len(prefixes) > 8 else "")


def file_arch(path: Path, shapes: dict[str, tuple]) -> str:
    """sd1 | sd2 | sdxl from the key names of an original-layout checkpoint, or ModelError."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if any(".lora_down." in k or ".lora_A." in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ModelError(f"{path}: this is a LoRA, not a base model: put it in models/Lora and choose a Stable "
                         f"Diffusion checkpoint as the base")
    if not has("model.diffusion_model."):
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint in the original layout (no "
                         f"model.diffusion_model.* UNet keys; seen: {_seen(keys)}). If the family is known, set "
                         f"model.family, but the file must hold a whole model (UNet, VAE, text encoder).")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(f"{path}: its UNet takes {conv_in[1]} input channels (an inpainting or instruct-pix2pix "
                         f"model); only plain text-to-image checkpoints (4 channels) can be trained here")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ModelError(f"{path}: this is an SDXL refiner (one OpenCLIP-G encoder); train on an SDXL base model")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ModelError(f"{path}: unknown model family: no known text encoder layout (expected "
                     f"cond_stage_model.transformer.* for SD 1.x, cond_stage_model.model.* for SD 2.x, "
                     f"conditioner.embedders.* for SDXL; seen: {_seen(keys)}). Set model.family "
                     f"(sd1, sd2, sd2-v, sdxl) if you know it.")


def _sd2_prediction(path: Path, tensor, metadata: dict) -> str:
    """sd2 or sd2-v for an SD 2.x single file (the module docstring gives the order of the rules)."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        v = re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(errors="replace"), re.M)
        return "sd2-v" if v else "sd2"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec:
        return "sd2-v" if spec.startswith("v") else "sd2"
    if "768-v" in metadata.get("modelspec.architecture", ""):
        return "sd2-v"
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    try:
        bias = tensor(probe).float()
    except KeyError:
        return "sd2"
    return "sd2-v" if bias.std(unbiased=False).item() > 0.09 else "sd2"


def file_family(path: Path, shapes: dict, tensor, metadata: dict) -> Family:
    arch = file_arch(path, shapes)
    return FAMILIES[_sd2_prediction(path, tensor, metadata) if arch == "sd2" else arch]


def detect_family(path) -> Family:
    """The family of a diffusers folder or a single checkpoint file; ModelError naming the file and the reason."""
    path = resolve_path(path)
    if path.is_dir():
        return folder_family(path)
    check_suffix(path)
    if path.suffix.lower() == ".safetensors":  # read the header and at most one tensor, not the whole file
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return file_family(path, shapes, f.get_tensor, f.metadata() or {})
        except ModelError:
            raise
        except Exception as e:
            raise not_safetensors(path, e) from e
    state = read_pickle(path)
    return file_family(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, {})


def check_suffix(path: Path) -> None:
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelError(f"{path}: not a checkpoint: expected a .safetensors or .ckpt file or a diffusers folder")


# ---------------------------------------------------------------------------------------------------------------
# A LoRA file's family: a weight layout (Family.arch: sd1 | sd2 | sdxl), since sd2 and sd2-v LoRAs are alike.

# How LoRA metadata names each layout, as prefixes of kohya's ss_base_model_version and of modelspec.architecture.
LORA_METADATA_NAMES = {"sdxl": ("sdxl", "stable-diffusion-xl"), "sd2": ("sd_v2", "stable-diffusion-v2"),
                       "sd1": ("sd_v1", "stable-diffusion-v1")}


def detect_lora_family(entries, metadata: dict[str, str]) -> str:
    """sd1 | sd2 | sdxl | unknown for a LoRA file (`entries`: lora_formats.Entry, one per module), from its metadata
    when it says, else from which modules the file covers (topology, never widths, so tiny test models read like
    real ones). Base models are detect_family's."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    for family, (version_prefix, _) in LORA_METADATA_NAMES.items():
        if version.startswith(version_prefix):
            return "sd2" if family == "sd1" and metadata.get("ss_v2") == "True" else family
    for family, (_, arch_prefix) in LORA_METADATA_NAMES.items():
        if arch.startswith(arch_prefix):
            return family
    names = {e.part: [] for e in entries}
    for e in entries:
        names[e.part].append(e.name.replace(".", "_"))
    if "text_encoder_2" in names or any(e.name.startswith("lora_te1_") for e in entries):
        return "sdxl"
    unet = names.get("unet", []) + (names.get(None, []) if None in names else [])
    # SDXL: up to 10 transformer blocks per attention, none in the first down block, 3 down blocks, 9 input blocks
    if any(re.search(r"transformer_blocks_[1-9]", n) for n in unet):
        return "sdxl"
    # SD 1.x's proj_in/proj_out are 1×1 convolutions (4-D LoRA tensors), SD 2.x's Linear layers
    proj = [e.tensors["down"].dim() for e in entries if e.algorithm == "lora" and e.name.endswith(("proj_in", "proj_out"))]
    if proj:
        return "sd1" if proj[0] == 4 else "sd2"
    te_layers = [int(m[1]) for e in entries if e.part in ("text_encoder", None)
                 for m in [re.search(r"layers[._](\d+)[._]", e.name)] if m]
    if te_layers:  # CLIP-L has 12 layers, SD 2.x's OpenCLIP-H 23 (SDXL's te1 is named te1)
        return "sd2" if max(te_layers) >= 12 else "sd1"
    return "unknown"  # SD 1.x or 2.x, or a file that covers too little to tell; shapes decide when applied
