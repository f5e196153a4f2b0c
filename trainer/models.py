"""The base model: which Stable Diffusion family a checkpoint is, and loading it offline.

Two forms are read, both without any network access:
- a diffusers folder (model_index.json + unet/, vae/, text_encoder/ …) carries configs, weights and tokenizer;
- a single file in the original LDM/SGM layout (A1111 / ComfyUI / Civitai): `.safetensors`, or `.ckpt` read with
  torch.load(weights_only=True) only. It holds weights alone: the configs come from trainer/model_configs/<family>/
  (or a `config_dir` the caller passes) and the tokenizer from trainer/tokenizer/.

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

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.config import PROJECT_ROOT

if TYPE_CHECKING:  # the heavy libraries load only when a model does
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
DEMO_MODEL_DIR = PROJECT_ROOT / "models" / "demo"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ModelError(ValueError):
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


@dataclass
class BaseModel:
    family: Family
    path: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list  # [CLIPTextModel] or, for SDXL, [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list  # one CLIPTokenizer per text encoder
    noise_scheduler: DDPMScheduler  # the training noise schedule, with the family's prediction type
    identity: str  # short hash of path + sizes + mtimes: changes when the weights change, keys caches


def default_base_model() -> Path:
    return DEMO_MODEL_DIR


def list_checkpoints(models_dir: str | Path) -> list[Path]:
    """Checkpoints in A1111's layout: models_dir/Stable-diffusion/**/*.safetensors|*.ckpt and diffusers folders."""
    root = Path(models_dir).expanduser() / "Stable-diffusion"
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "model_index.json" in files:
            found.append(Path(folder))
            dirs[:] = []  # the .safetensors inside a diffusers folder are its parts, not checkpoints
            continue
        found += [Path(folder) / f for f in files if f.lower().endswith(CHECKPOINT_SUFFIXES)]
    return sorted(found, key=lambda p: str(p.relative_to(root)).lower())


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)} (or 'auto')")
    return FAMILIES[name]


# ---------------------------------------------------------------------------------------------------------------
# Family detection


def _resolve(path) -> Path:
    path = default_base_model() if path in ("", None) else Path(path).expanduser()
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


def _folder_family(folder: Path) -> Family:
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


def _file_arch(path: Path, shapes: dict[str, tuple]) -> str:
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


def _file_family(path: Path, shapes: dict, tensor, metadata: dict) -> Family:
    arch = _file_arch(path, shapes)
    return FAMILIES[_sd2_prediction(path, tensor, metadata) if arch == "sd2" else arch]


def detect_family(path) -> Family:
    """The family of a diffusers folder or a single checkpoint file; ModelError naming the file and the reason."""
    path = _resolve(path)
    if path.is_dir():
        return _folder_family(path)
    _check_suffix(path)
    if path.suffix.lower() == ".safetensors":  # read the header and at most one tensor, not the whole file
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return _file_family(path, shapes, f.get_tensor, f.metadata() or {})
        except ModelError:
            raise
        except Exception as e:
            raise _not_safetensors(path, e) from e
    state = _read_pickle(path)
    return _file_family(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, {})


# ---------------------------------------------------------------------------------------------------------------
# Reading single files


def _check_suffix(path: Path) -> None:
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


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".ckpt":
        state, metadata = _read_pickle(path), {}
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
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


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    # SD 2.x and SDXL's second encoder were trained with OpenCLIP, which pads with "!" (id 0), not end-of-text.
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, pad_token=pad)


def _shipped_tokenizers(family: Family) -> list:
    if family.is_sdxl:
        return [_tokenizer(), _tokenizer("!")]
    return [_tokenizer("!" if family.arch == "sd2" else "<|endoftext|>")]


def _noise_scheduler(family: Family):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=family.prediction_type, clip_sample=False)


def _identity(path: Path) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else ''}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _vae_dtype(family: Family, dtype: torch.dtype) -> torch.dtype:
    # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in fp32 then; bf16 has the range.
    return torch.float32 if family.is_sdxl and dtype == torch.float16 else dtype


def _load_folder(folder: Path, family: Family, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def part(what, load):
        try:
            return load()
        except Exception as e:
            raise ModelError(f"{folder}: cannot load its {what} ({type(e).__name__}: {e})") from e

    kw = dict(local_files_only=True)
    unet = part("unet", lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **kw))
    vae = part("vae", lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae",
                                                            torch_dtype=_vae_dtype(family, dtype), **kw))
    names = ["text_encoder", "text_encoder_2"] if family.is_sdxl else ["text_encoder"]
    classes = [CLIPTextModel, CLIPTextModelWithProjection]
    encoders = [part(n, lambda n=n, c=c: c.from_pretrained(folder, subfolder=n, **kw).to(dtype))
                for n, c in zip(names, classes)]
    tokenizers = _shipped_tokenizers(family)
    for i, n in enumerate(["tokenizer", "tokenizer_2"][: len(names)]):
        if (folder / n).is_dir():  # the folder's own tokenizer may carry added tokens
            tokenizers[i] = part(n, lambda n=n: CLIPTokenizer.from_pretrained(folder, subfolder=n, **kw))
    return unet, vae, encoders, tokenizers


def _fill(model, state: dict, what: str, path: Path, family: Family, dtype: torch.dtype):
    """Give an empty (meta) model its weights from a converted state dict; every tensor must be there."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelError(f"{path}: the {what} weights do not fit the {family.name} configuration: {len(missing)} "
                         f"of {len(expected)} tensors missing (e.g. {', '.join(missing[:3])}). A partial file, or "
                         f"another family: check model.family")
    ignored = [k for k in state if k not in expected]
    if ignored:
        logger.info("%s: %d %s tensors not used: %s", path, len(ignored), what, ignored[:5])
    cast = {k: (state[k].to(dtype) if state[k].is_floating_point() else state[k]).contiguous() for k in expected}
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: the {what} weights do not fit the {family.name} configuration ({e}). If it is "
                         f"another family, set model.family") from e
    return model.eval()


def _load_file(path: Path, family: Family, config_dir: Path, state: dict, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def empty(cls, config):
        with init_empty_weights():  # parameters on meta: no memory until the checkpoint's tensors are assigned
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)

    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
    unet = _fill(empty(UNet2DConditionModel, unet_config), sfu.convert_ldm_unet_checkpoint(state, unet_config),
                 "unet", path, family, dtype)
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
    vae = _fill(empty(AutoencoderKL, vae_config), sfu.convert_ldm_vae_checkpoint(state, vae_config),
                "vae", path, family, _vae_dtype(family, dtype))

    def encoder(cls, subfolder, convert):
        config = CLIPTextConfig.from_pretrained(config_dir / subfolder, local_files_only=True)
        model = empty(cls, config)
        converted = convert(model)
        if not hasattr(model, "text_model"):  # transformers 5 dropped this level from CLIPTextModel
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        return _fill(model, converted, subfolder, path, family, dtype)

    # Each encoder is converted from its own key prefix, chosen by family: diffusers' own choice compares
    # widths, which cannot tell the two SDXL encoders apart in a tiny model.
    if family.is_sdxl:
        encoders = [encoder(CLIPTextModel, "text_encoder", lambda m: sfu.convert_ldm_clip_checkpoint(state)),
                    encoder(CLIPTextModelWithProjection, "text_encoder_2", lambda m: sfu.convert_open_clip_checkpoint(
                        m, state, prefix="conditioner.embedders.1.model."))]
    elif family.arch == "sd2":
        encoders = [encoder(CLIPTextModel, "text_encoder", lambda m: sfu.convert_open_clip_checkpoint(
            m, state, prefix="cond_stage_model.model."))]
    else:
        encoders = [encoder(CLIPTextModel, "text_encoder", lambda m: sfu.convert_ldm_clip_checkpoint(state))]
    return unet, vae, encoders, _shipped_tokenizers(family)


def load_base_model(path="", family: str = "auto", dtype: torch.dtype = torch.float32,
                    config_dir: str | Path | None = None) -> BaseModel:
    """Load a diffusers folder or a single checkpoint offline, frozen (requires_grad False, eval mode).

    path: "" means the built-in demo model. family: "auto" or a name in FAMILIES (see the module docstring).
    dtype: of the frozen weights (bf16/fp16 to train on a GPU); SDXL's VAE stays fp32 under fp16.
    config_dir: a local diffusers-layout folder whose configs describe a single file, instead of the shipped
    trainer/model_configs/<family> (tests pass tiny models' folders; a user may pass a model's own configs).
    """
    path = _resolve(path)
    wanted = None if family == "auto" else get_family(family)
    if path.is_dir():
        fam = _folder_family(path)
        if wanted is not None:
            _check_override(path, fam, wanted)
            fam = wanted
        unet, vae, encoders, tokenizers = _load_folder(path, fam, dtype)
    else:
        _check_suffix(path)
        state, metadata = _read_state(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        config_dir = Path(config_dir).expanduser() if config_dir else None
        if config_dir is not None and not config_dir.is_dir():
            raise ModelError(f"{config_dir}: config_dir not found: it must be a local diffusers-layout folder")
        given = _folder_family(config_dir) if config_dir else None
        try:
            arch = _file_arch(path, shapes)
        except ModelError:
            if wanted is None:
                raise
            arch = wanted.arch  # an unrecognised layout under an explicit family: loading will tell
        if given is not None and given.arch != arch:
            raise ModelError(f"{path}: the weights are {arch} but config_dir {config_dir} describes {given.name}")
        if wanted is not None:
            _check_override(path, FAMILIES[arch], wanted)
            fam = wanted
        elif given is not None:
            fam = given
        else:
            fam = _file_family(path, shapes, state.__getitem__, metadata)
        unet, vae, encoders, tokenizers = _load_file(path, fam, config_dir or MODEL_CONFIGS_DIR / fam.name,
                                                     state, dtype)
        del state
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(family=fam, path=path, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                     noise_scheduler=_noise_scheduler(fam), identity=_identity(path))


def _check_override(path: Path, detected: Family, wanted: Family) -> None:
    if detected.arch != wanted.arch:
        raise ModelError(f"{path}: model.family is {wanted.name!r} but the weights are {detected.arch}: set "
                         f"model.family to 'auto' or to {detected.arch!r}")
