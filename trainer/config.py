"""The run configuration: one typed tree of dataclasses, read from and written to TOML.

A preset (presets/*.toml) is a sparse override of these defaults; a run config is a preset plus the user's
overrides. An unknown key or a value of the wrong kind is a ConfigError that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from .atomic import write_text
from .errors import StudioError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_ROOT / "presets"


class ConfigError(StudioError):
    """A user-facing configuration error; the message names the key and the fix."""


@dataclass
class ModelConfig:
    base_model: str = ""  # a diffusers folder or a single .safetensors/.ckpt file; "" = the built-in demo model
    family: str = "auto"  # auto | sd1 | sd2 | sd2-v | sdxl: auto reads it from the weights; set it only to override
    clip_skip: int = 1  # 2 = condition on the penultimate CLIP layer (anime SD 1.x models); SDXL always uses penultimate


@dataclass
class DataConfig:
    dataset: str = ""  # a folder of images + captions, a parent of kohya `N_name` folders, or a dataset .toml
    caption_extension: str = ".txt"  # .caption files are accepted too when no file with this extension exists
    caption_lines: str = "first"  # first | random: random picks one line of a multi-line caption each step
    trigger_word: str = ""  # prepended once to every caption (never twice); it stays first when tags are shuffled
    shuffle_tags: bool = False  # shuffle comma-separated tags each epoch, keeping the first keep_tokens in place
    keep_tokens: int = 0  # tags kept in place when shuffling, counted after the trigger word
    caption_dropout: float = 0.0  # probability of training a step on an empty caption (helps CFG)
    tag_dropout: float = 0.0  # probability of dropping each tag (not the kept ones)
    resolution: int = 512  # bucket pixel budget is resolution²
    min_bucket_reso: int = 0  # smallest bucket side; 0 = resolution / 2 (256 at 512, kohya's default)
    max_bucket_reso: int = 0  # largest bucket side; 0 = resolution × 2 (1024 at 512)
    bucket_step: int = 64  # 64 works for every family; 32 is allowed for SDXL
    no_upscale: bool = False  # True: small images get smaller buckets instead of being upscaled
    crop: str = "center"  # center | random (random disables the latent cache: each epoch sees a new crop)
    flip: bool = False  # random horizontal flip; both flips are cached
    background: str = "white"  # colour that transparent pixels are composited on
    repeats: int = 1  # repeats of a plain folder (kohya N_name folders carry their own)
    prior_loss_weight: float = 1.0  # loss weight of regularisation images
    cache_latents: str = "auto"  # auto | disk | off: auto = on disk whenever augmentation allows it
    # share of the images held out of training for the validation loss (every n-th image); 0 = none held out:
    # the loss is then measured on the training images (labelled so), unless evaluation.validation_dir is set
    validation_split: float = 0.0


    def bucket_range(self) -> tuple[int, int]:
        low = self.min_bucket_reso or max(self.bucket_step, self.resolution // 2)
        return low, self.max_bucket_reso or self.resolution * 2


@dataclass
class NetworkConfig:
    rank: int = 16  # the LoRA dimension r
    alpha: float = 8.0  # update scale is alpha / rank: alpha = rank/2 keeps kohya's usual strength
    dropout: float = 0.0  # dropout on the LoRA branch input
    train_text_encoder: bool = True  # False: UNet-only LoRA (text-encoder outputs can then be cached)
    init_weights: str = "gaussian"  # gaussian | zeros | kaiming; up (lora_B) always starts at zero
    # LoCon (kohya's conv_dim / conv_alpha): > 0 also trains the UNet's ResNet blocks, their 3x3 convolutions at
    # this rank. Textures and fine detail learn faster; A1111 ≥ 1.5, ComfyUI and diffusers load it. 0 = off.
    conv_rank: int = 0
    conv_alpha: float = 1.0  # conv update scale is conv_alpha / conv_rank (kohya's default conv_alpha is 1)


@dataclass
class OptimizerConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (adaptive: set lr = 1.0)
    learning_rate: float = 1e-4
    unet_lr: float = 0.0  # 0 = use learning_rate
    text_encoder_lr: float = 0.0  # 0 = use learning_rate; half the UNet rate is a common choice for AdamW
    weight_decay: float = 1e-2
    scheduler: str = "constant"  # constant | constant_with_warmup | cosine | cosine_with_restarts | linear
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainingConfig:
    steps: int = 1000  # optimiser steps; ignored when epochs > 0
    epochs: int = 0  # 0 = train for `steps`
    batch_size: int = 1  # per process; the global batch is batch_size × processes × grad_accum
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16: auto = bf16 where the hardware has it, else fp16 on CUDA, else no
    gradient_checkpointing: bool = False  # trades ~30% speed for much less activation memory
    # Linux/glibc: freed blocks of 4 MB and more go back to the OS at once instead of being kept for the next step.
    # SD 1.5 on a CPU at 512 px: lower peak RAM, slower steps (page faults); see trainer/memory.py.
    return_freed_memory: bool = False
    # CPU, bf16/fp16: attention probabilities kept for backward instead of recomputed, up to this many MB per step
    # (SD 1.5 at 512 px: 1024 → steps 0.89× as long for 0.75 GB more peak RSS; trainer/cpu_attention.py). 0 = none.
    attention_memory_mb: int = 1024
    seed: int = 42
    min_snr_gamma: float = 0.0  # 5.0 is the paper's value; 0 disables
    # The timesteps trained, kohya's --min_timestep / --max_timestep: [min, max) of the scheduler's 0-1000. High noise
    # decides composition (which figure where), low noise texture; a style kept off the top learns its texture
    # without redrawing the prompt's shapes. 0 / 0 = the whole range.
    min_timestep: int = 0
    max_timestep: int = 0  # 0 = the scheduler's num_train_timesteps
    noise_offset: float = 0.0  # 0.05-0.1 helps very dark/bright images
    cache_text_encoder_outputs: str = "auto"  # auto | off: auto = cached when the text encoder is frozen and captions are fixed
    # A step whose loss or gradients are NaN/inf is skipped (weights untouched); this many in a row stop the run
    # with the last finite checkpoint kept (too high a learning rate or fp16 overflow, usually).
    max_nonfinite_steps: int = 5


@dataclass
class SampleConfig:
    every_n_steps: int = 0  # 0 = no samples during training (one is still made at the end if prompts exist)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    seed: int = 1234  # sample i uses seed + i, the same at every step, so pictures are comparable
    steps: int = 20
    cfg: float = 7.0
    width: int = 0  # 0 = data.resolution
    height: int = 0


@dataclass
class EvaluationConfig:
    """Measured at every checkpoint (trainer/evaluation.py): the `evaluation` and `recommendation` events."""
    at_checkpoints: str = "auto"  # auto | off: auto = every checkpoint is measured and one is recommended
    leak_prompts: list[str] = field(default_factory=list)  # prompts the LoRA should leave alone; [] = the sample prompts without the trigger words
    # Training pictures (those with the trigger word) redrawn at each checkpoint and compared with themselves
    # (eval_metrics.likeness). 6, not 2: with 2 the likeness of neighbouring checkpoints swung by more than the LoRA
    # changed (stop 26, scripts/prove_recommendation.py).
    likeness_images: int = 6
    # Denoising steps of its pictures (sample.cfg, sample.seed): like is compared with like, so fewer than samples'.
    # The redraws take the part of these below eval_metrics.REDRAW_STRENGTH (4 of 6). 6: evaluation stays within
    # 15% of the demo run's training time (measured 12.8% idle, at 8 steps 15.1%, before the redraws; with them the
    # same share as before, side by side: scripts/measure_evaluation_cost.py).
    steps: int = 6
    validation_dir: str = ""  # held-out images with captions for the validation loss ("" = data.validation_split)
    validation_images: int = 4  # at most this many images in the validation loss (8 timesteps each: one model call)


@dataclass
class OutputConfig:
    name: str = "my-lora"  # file stem; no ':' or ',' (A1111's <lora:name:w> syntax splits on them)
    lora_dir: str = "models/Lora"  # where the finished .safetensors goes
    run_dir: str = ""  # checkpoints, samples, events.jsonl; "" = runs/<name>
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    # A checkpoint at least this often by the clock as well, so a crash or full disk never costs more than this
    # much training, however long the steps are. 0 = off.
    save_every_n_minutes: float = 10.0
    save_precision: str = "fp16"  # fp16 | fp32 for lora_up/lora_down (alpha is always fp32)
    format: str = "kohya"  # kohya | diffusers (diffusers-format files do not load in A1111/ComfyUI)
    comment: str = ""  # written as ss_training_comment


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def output_path(self) -> Path:
        return Path(self.output.lora_dir) / f"{self.output.name}.safetensors"

    def run_path(self) -> Path:
        return Path(self.output.run_dir or f"runs/{self.output.name}")


# String choices, checked in validate(). Keeping them here (not scattered) gives one place to extend.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("auto", "sd1", "sd2", "sd2-v", "sdxl"),
    "data.crop": ("center", "random"),
    "data.caption_lines": ("first", "random"),
    "data.cache_latents": ("auto", "disk", "off"),
    "network.init_weights": ("gaussian", "zeros", "kaiming"),
    "optimizer.optimizer": ("adamw", "adamw8bit", "prodigy"),
    "optimizer.scheduler": ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"),
    "training.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "training.cache_text_encoder_outputs": ("auto", "off"),
    "evaluation.at_checkpoints": ("auto", "off"),
    "output.save_precision": ("fp16", "fp32"),
    "output.format": ("kohya", "diffusers"),
}

# Number ranges, checked in validate(): (lowest, highest or None, whether the lowest itself is refused, why).
RANGES: dict[str, tuple[float, float | None, bool, str]] = {
    "model.clip_skip": (1, None, False, "1 = CLIP's last layer, 2 = the penultimate"),
    "data.resolution": (0, None, True, "512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL"),
    "data.repeats": (1, None, False, ""),
    "data.keep_tokens": (0, None, False, ""),
    "data.min_bucket_reso": (0, None, False, "0 = resolution / 2"),
    "data.max_bucket_reso": (0, None, False, "0 = resolution × 2"),
    "data.caption_dropout": (0, 1, False, "a probability"),
    "data.tag_dropout": (0, 1, False, "a probability"),
    "data.prior_loss_weight": (0, None, False, ""),
    "network.rank": (1, None, False, "4-32 for styles, 32+ for detailed characters"),
    "network.alpha": (0, None, True, "the usual choice is rank/2 or rank"),
    "network.dropout": (0, 1, False, "a probability"),
    "network.conv_rank": (0, None, False, "0 = off; 4-16 is usual for LoCon styles"),
    "network.conv_alpha": (0, None, True, "1 is kohya's default; conv_rank/2 or conv_rank train faster"),
    "optimizer.learning_rate": (0, None, True, "1e-4 is usual for AdamW, 1.0 for Prodigy"),
    "optimizer.unet_lr": (0, None, False, "0 = the learning rate"),
    "optimizer.text_encoder_lr": (0, None, False, "0 = the learning rate"),
    "optimizer.weight_decay": (0, None, False, ""),
    "optimizer.warmup_steps": (0, None, False, ""),
    "optimizer.max_grad_norm": (0, None, False, "0 disables clipping"),
    "training.steps": (0, None, False, ""),
    "training.epochs": (0, None, False, "0 = train for steps"),
    "training.batch_size": (1, None, False, ""),
    "training.grad_accum": (1, None, False, ""),
    "training.attention_memory_mb": (0, None, False, "0 keeps none"),
    "training.min_snr_gamma": (0, None, False, "5 is the paper's value; 0 disables"),
    "training.min_timestep": (0, 1000, False, "0 = from the start of the schedule"),
    "training.max_timestep": (0, 1001, False, "0 = to its end (1000)"),
    "training.noise_offset": (0, None, False, "0.05-0.1 for very dark or bright images"),
    "sample.every_n_steps": (0, None, False, "0 = only at the end"),
    "sample.steps": (1, None, False, ""),
    "sample.cfg": (0, None, False, "7 is usual"),
    "sample.width": (0, None, False, "0 = the training resolution"),
    "sample.height": (0, None, False, "0 = the training resolution"),
    "data.validation_split": (0, 0.5, False, "0.1 holds out every tenth image"),
    "evaluation.likeness_images": (0, None, False, "0 = no likeness"),
    "evaluation.validation_images": (1, None, False, ""),
    "evaluation.steps": (1, None, False, "8 settles Euler's pictures enough to compare"),
    "output.save_every_n_steps": (0, None, False, "0 = only at the end"),
    "output.save_every_n_epochs": (0, None, False, "0 = only at the end"),
    "output.save_every_n_minutes": (0, None, False, "0 = no clock-based checkpoints; 10 is the default"),
    "training.max_nonfinite_steps": (1, None, False, "5 is the default"),
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one TOML value against its field type; ints are accepted where floats are expected."""
    if get_origin(typ) is list:
        (inner,) = get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"`{key}` must be a finite number, got {value!r}")
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"`{key}` must be true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"`{key}` must be a whole number, got {value!r}")
    if typ in (float, str) and not isinstance(value, typ):
        raise ConfigError(f"`{key}` must be a {typ.__name__}, got {value!r}")
    return value


def _apply(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key `{full}`; allowed here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"`{full}` is a section; write it as [{full}] with keys {', '.join(f.name for f in dataclasses.fields(current))}")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _check_choices(obj, section: str) -> None:
    for key, allowed in CHOICES.items():
        if key.startswith(section + "."):
            value = getattr(obj, key.split(".")[1])
            if value not in allowed:
                raise ConfigError(f"`{key}` = {value!r} is not one of: {', '.join(allowed)}")


def _check_ranges(obj, section: str) -> None:
    for key, (low, high, low_refused, why) in RANGES.items():
        if not key.startswith(section + "."):
            continue
        value = getattr(obj, key.split(".")[1])
        if value < low or (low_refused and value == low) or (high is not None and value >= high):
            allowed = f"in [{low}, {high})" if high is not None else f"> {low}" if low_refused else f"≥ {low}"
            raise ConfigError(f"`{key}` must be {allowed}{f' ({why})' if why else ''}, got {value}")


def validate_data(data: DataConfig) -> DataConfig:
    """The [data] checks. load_dataset runs them too: the CLI's `dataset` command and the UI's dataset report
    take a DataConfig on its own, without the rest of a run."""
    _check_choices(data, "data")
    _check_ranges(data, "data")
    if data.bucket_step not in (32, 64):
        raise ConfigError(f"`data.bucket_step` must be 64 (or 32 for SDXL), got {data.bucket_step}")
    if data.resolution % data.bucket_step:
        raise ConfigError(f"`data.resolution` ({data.resolution}) must be a multiple of `data.bucket_step` ({data.bucket_step})")
    return data


def validate(cfg: TrainConfig) -> TrainConfig:
    for section in ("model", "network", "optimizer", "training", "sample", "evaluation", "output"):
        _check_choices(getattr(cfg, section), section)
        _check_ranges(getattr(cfg, section), section)
    validate_data(cfg.data)
    if cfg.training.steps == 0 and cfg.training.epochs == 0:
        raise ConfigError("set `training.steps` or `training.epochs` to a positive number")
    o = cfg.optimizer
    if o.optimizer == "prodigy" and {o.unet_lr or o.learning_rate, o.text_encoder_lr or o.learning_rate} != {o.learning_rate}:
        raise ConfigError("Prodigy adapts one step size for all parameters: leave `optimizer.unet_lr` and "
                          "`optimizer.text_encoder_lr` at 0 and set `optimizer.learning_rate` (1.0 is the norm)")
    tr = cfg.training
    if tr.max_timestep and tr.min_timestep >= tr.max_timestep:
        raise ConfigError(f"`training.min_timestep` = {tr.min_timestep} must be below `training.max_timestep` = "
                          f"{tr.max_timestep}: raise max_timestep or set it to 0 (the end of the schedule)")
    check_name(cfg.output.name)
    for side in ("width", "height"):
        if getattr(cfg.sample, side) % 8:
            raise ConfigError(f"`sample.{side}` = {getattr(cfg.sample, side)} must be a multiple of 8 (the VAE "
                              "works in 8-pixel cells), or 0 for the training resolution")
    return cfg


def check_name(name: str) -> None:
    """A LoRA / run name is a plain file stem: it becomes both a file name and a folder name."""
    bad = [c for c in ':,/\\' if c in name]
    if not name or bad:
        raise ConfigError(f"`output.name` = {name!r} must be a non-empty file stem without {' '.join(bad or [':', ','])} "
                          "(A1111's <lora:name:weight> syntax splits on ':' and ',')")
    if name.strip(". ") == "" or name != name.strip() or name.startswith(".") or len(name) > 120 \
            or any(ord(c) < 32 for c in name):
        raise ConfigError(f"`output.name` = {name!r} must be a plain file name: letters, digits, '-', '_' or "
                          "spaces, not starting with '.' and at most 120 characters, e.g. 'my-style'")


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(known) or '(none)'}")
    return path


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """Defaults, then each layer of overrides in order (preset, config file, command line)."""
    cfg = TrainConfig()
    for layer in layers:
        layer = dict(layer)
        preset = layer.pop("preset", None)
        if preset:
            _apply(cfg, read_toml(preset_path(preset)))
        _apply(cfg, layer)
    return validate(cfg)


def load_config(path: str | Path, *extra: dict[str, Any]) -> TrainConfig:
    """A run config file; a top-level `preset = "name"` key in it is applied first."""
    return build_config(read_toml(path), *extra)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    write_text(path, cfg.to_toml())
