"""Which Stable Diffusion family a base model is, and reading a single-file checkpoint's tensors, offline.

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
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PROJECT_ROOT
from .errors import StudioError

DEMO_MODEL_DIR = PROJECT_ROOT / "models" / "demo"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ModelError(StudioError):
    """A base model that cannot be used; the message names the path, the reason and the fix."""


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
            raise _not_safetensors(path, e) from e
    state = _read_pickle(path)
    return file_family(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, {})


# ---------------------------------------------------------------------------------------------------------------
# Reading single files


def check_suffix(path: Path) -> None:
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelError(f"{path}: not a checkpoint: expected a .safetensors or .ckpt file or a diffusers folder")


def _not_safetensors(path: Path, error: Exception) -> ModelError:
    return ModelError(f"{path}: not a valid .safetensors file ({error}); an interrupted download or a renamed "
                      f"file? Download it again or pick another checkpoint")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt through torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = f" (it contains {found.group(1)})" if found else ""
            raise ModelError(f"{path}: refused: this .ckpt holds Python objects besides tensors{what}, and "
                             f"unpickling them could run arbitrary code. Convert it to .safetensors with a tool "
                             f"you trust, or use a .safetensors download of the same model.") from e
        raise ModelError(f"{path}: not a checkpoint: torch.load cannot read it ({e})") from e
    except Exception as e:
        raise ModelError(f"{path}: not a checkpoint: torch.load cannot read it ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning wraps the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# Some older checkpoints lack CLIP's `text_model.` level; A1111 reads them by the same renaming.
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def read_state(path: Path, dtype: torch.dtype | None = None,
               keep=lambda name: False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a single-file checkpoint. With `dtype`, a .safetensors file stored in another
    precision is read tensor by tensor and cast as it arrives (trainer/weights.py: half the peak memory of casting
    a memory map); tensors whose name `keep(name)` is true stay as stored. Otherwise the file is memory-mapped."""
    if path.suffix.lower() == ".ckpt":
        state, metadata = _read_pickle(path), {}
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from trainer.weights import needs_cast, read_cast

        try:
            if dtype is not None and needs_cast(path, dtype):
                state, metadata = read_cast(path, dtype, keep)
            else:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                state = load_file(str(path))
        except Exception as e:
            raise _not_safetensors(path, e) from e
    for prefix in CLIP_PREFIXES:
        old = [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "text_model.")]
        for k in old:
            state[prefix + "text_model." + k.removeprefix(prefix)] = state.pop(k)
    return state, metadata
