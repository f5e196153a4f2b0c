"""The base model: loading a checkpoint offline into frozen diffusers/transformers modules.

Two forms are read, both without any network access:
- a diffusers folder (model_index.json + unet/, vae/, text_encoder/ …) carries configs, weights and tokenizer;
- a single file in the original LDM/SGM layout (A1111 / ComfyUI / Civitai): `.safetensors`, or `.ckpt` read with
  torch.load(weights_only=True) only. It holds weights alone: the configs come from trainer/model_configs/<family>/
  (or a `config_dir` the caller passes) and the tokenizer from trainer/tokenizer/.

The family rules are in trainer/families.py, the single-file readers in trainer/weights.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.errors import ModelError
from trainer.families import (CHECKPOINT_SUFFIXES, DEMO_MODEL_DIR, FAMILIES, Family, check_suffix, file_arch,
                              file_family, folder_family, get_family, resolve_path)
from trainer.weights import needs_cast, read_cast, read_state

if TYPE_CHECKING:  # the heavy libraries load only when a model does
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


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
    # The SD VAEs overflow in fp16 (SDXL's visibly; its config says force_upcast; SD 1.x's now and then, A1111's
    # --no-half-vae): under fp16 the VAE stays fp32, read so from the file rather than rounded and cast back.
    # bf16 has fp32's range.
    return torch.float32 if dtype == torch.float16 else dtype


def _load_folder(folder: Path, family: Family, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def part(what, load):
        try:
            return load()
        except Exception as e:
            raise ModelError(f"{folder}: cannot load its {what} ({type(e).__name__}: {e})") from e

    kw = dict(local_files_only=True)

    def diffusers_part(cls, sub, part_dtype):
        # A single weights file stored in another precision is read and cast tensor by tensor (half the peak
        # memory of from_pretrained's cast of a memory map); anything else goes through from_pretrained.
        file = folder / sub / "diffusion_pytorch_model.safetensors"
        if file.is_file() and needs_cast(file, part_dtype):
            state, _ = read_cast(file, part_dtype)
            model = _fill(_empty(cls, cls.load_config(folder, subfolder=sub, **kw)), state, sub, file, family,
                          part_dtype)
            model.register_to_config(_name_or_path=folder)  # as from_pretrained records it
            return model
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=part_dtype, **kw)

    unet = part("unet", lambda: diffusers_part(UNet2DConditionModel, "unet", dtype))
    vae = part("vae", lambda: diffusers_part(AutoencoderKL, "vae", _vae_dtype(family, dtype)))
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


def _empty(cls, config):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta: no memory until the checkpoint's tensors are assigned
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def _load_file(path: Path, family: Family, config_dir: Path, state: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
    unet = _fill(_empty(UNet2DConditionModel, unet_config), sfu.convert_ldm_unet_checkpoint(state, unet_config),
                 "unet", path, family, dtype)
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
    vae = _fill(_empty(AutoencoderKL, vae_config), sfu.convert_ldm_vae_checkpoint(state, vae_config),
                "vae", path, family, _vae_dtype(family, dtype))

    def encoder(cls, subfolder, convert):
        config = CLIPTextConfig.from_pretrained(config_dir / subfolder, local_files_only=True)
        model = _empty(cls, config)
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
    dtype: of the frozen weights (bf16/fp16 to train on a GPU); the VAE stays fp32 under fp16.
    config_dir: a local diffusers-layout folder whose configs describe a single file, instead of the shipped
    trainer/model_configs/<family> (tests pass tiny models' folders; a user may pass a model's own configs).
    """
    path = resolve_path(path)
    wanted = None if family == "auto" else get_family(family)
    if path.is_dir():
        fam = folder_family(path)
        if wanted is not None:
            _check_override(path, fam, wanted)
            fam = wanted
        unet, vae, encoders, tokenizers = _load_folder(path, fam, dtype)
    else:
        check_suffix(path)
        # fp16 keeps the VAE's tensors as stored: the VAE is run in fp32 under fp16 (SD VAEs overflow in fp16).
        state, metadata = read_state(path, dtype, keep=lambda name: dtype == torch.float16
                                     and name.startswith("first_stage_model."))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        config_dir = Path(config_dir).expanduser() if config_dir else None
        if config_dir is not None and not config_dir.is_dir():
            raise ModelError(f"{config_dir}: config_dir not found: it must be a local diffusers-layout folder")
        given = folder_family(config_dir) if config_dir else None
        try:
            arch = file_arch(path, shapes)
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
            fam = file_family(path, shapes, state.__getitem__, metadata)
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
