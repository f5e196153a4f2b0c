"""The training settings form: one table maps each widget to a TrainConfig key, both ways.

A preset fills the form; the form (plus an optional TOML box for any other key) becomes the run config with
trainer.config.build_config, so every value is checked by the engine and a bad one is a ConfigError naming it.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from trainer.config import CHOICES, PRESETS_DIR, ConfigError, TrainConfig, build_config


@dataclass(frozen=True)
class Setting:
    key: str  # "section.field" in TrainConfig
    label: str  # what the form calls it; error messages name it too (labelled())
    make: Callable[..., gr.components.Component]  # (label, value, elem_id) -> the widget showing the value

    @property
    def elem_id(self) -> str:
        """The widget's id in the page ("set-training-steps"), for tests and styles."""
        return "set-" + self.key.replace(".", "-").replace("_", "-")
    advanced: bool = False


# No `minimum=` on the numbers: Gradio's own refusal ("Value -5 is less than minimum value 0.") names no field;
# the engine's range check (trainer.config.RANGES) does, and labelled() adds the label.
def _num(info: str = "", integer: bool = True):
    return lambda label, value, elem_id=None: gr.Number(value, label=label, info=info or None,
                                                        precision=0 if integer else None, elem_id=elem_id)


def _check():
    return lambda label, value, elem_id=None: gr.Checkbox(value, label=label, elem_id=elem_id)


def _choice(key: str):
    return lambda label, value, elem_id=None: gr.Dropdown(list(CHOICES[key]), value=value, label=label, elem_id=elem_id)


SETTINGS = [
    Setting("training.steps", "Steps", _num("optimiser steps (used when epochs is 0)")),
    Setting("training.epochs", "Epochs", _num("0 = train for `Steps`")),
    Setting("network.rank", "Rank", _num("LoRA dimension: 4–32 for styles, 32+ for detailed characters")),
    Setting("network.alpha", "Alpha", _num("scale = alpha / rank; rank/2 is kohya's usual", integer=False)),
    Setting("optimizer.learning_rate", "Learning rate", _num(integer=False)),
    Setting("optimizer.unet_lr", "UNet learning rate", _num("0 = the learning rate", integer=False)),
    Setting("optimizer.text_encoder_lr", "Text encoder learning rate", _num("0 = the learning rate", integer=False)),
    Setting("data.resolution", "Resolution", _num("pixels; a multiple of 64")),
    Setting("network.train_text_encoder", "Train the text encoder", _check()),
    Setting("training.seed", "Seed", _num()),
    # ---- Advanced --------------------------------------------------------------------------------------
    Setting("network.conv_rank", "Conv rank (LoCon)",
            _num("also train the UNet's 3x3 convolutions at this rank: textures learn faster; 0 = off"), True),
    Setting("network.conv_alpha", "Conv alpha", _num("conv scale = conv alpha / conv rank", integer=False), True),
    Setting("optimizer.optimizer", "Optimizer", _choice("optimizer.optimizer"), True),
    Setting("optimizer.scheduler", "LR scheduler", _choice("optimizer.scheduler"), True),
    Setting("optimizer.warmup_steps", "Warmup steps", _num(), True),
    Setting("training.batch_size", "Batch size", _num(), True),
    Setting("training.grad_accum", "Gradient accumulation", _num(), True),
    Setting("training.mixed_precision", "Mixed precision", _choice("training.mixed_precision"), True),
    Setting("training.gradient_checkpointing", "Gradient checkpointing (less memory)", _check(), True),
    Setting("training.attention_memory_mb", "Attention memory (MB, CPU)",
            _num("bf16 on a CPU: faster steps for this much more RAM; 0 = none"), True),
    Setting("data.repeats", "Repeats per epoch", _num(), True),
    Setting("data.flip", "Random horizontal flip", _check(), True),
    Setting("data.shuffle_tags", "Shuffle comma-separated tags", _check(), True),
    Setting("data.keep_tokens", "Keep first N tags in place", _num(), True),
    Setting("data.caption_dropout", "Caption dropout", _num("probability, 0–1", integer=False), True),
    Setting("training.noise_offset", "Noise offset", _num("0.05–0.1 for very dark/bright images", integer=False), True),
    Setting("training.min_snr_gamma", "Min-SNR gamma", _num("5 is the paper's value; 0 = off", integer=False), True),
    Setting("training.min_timestep", "Min timestep", _num("train on timesteps from this one (0-999); 0 = all"), True),
    Setting("training.max_timestep", "Max timestep",
            _num("…below this one; lower keeps a style off the composition; 0 = 1000"), True),
    Setting("model.clip_skip", "CLIP skip", _num("2 for anime SD 1.x models"), True),
    Setting("sample.every_n_steps", "Sample images every N steps", _num("0 = only at the end"), True),
    Setting("sample.prompts", "Sample prompts",
            lambda label, value, elem_id=None: gr.Textbox(value, label=label, info="one per line", lines=3,
                                                          elem_id=elem_id), True),
    Setting("output.save_every_n_steps", "Save a checkpoint every N steps", _num("0 = only at the end"), True),
]


def labelled(message: str) -> str:
    """An engine message with each form setting's label beside its key: `training.steps` -> "Steps" (`...`)."""
    for s in SETTINGS:
        message = message.replace(f"`{s.key}`", f"\"{s.label}\" (`{s.key}`)")
    return message


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def default_preset() -> str | None:
    names = preset_names()
    return "demo" if "demo" in names else (names[0] if names else None)


def _get(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def form_values(cfg: TrainConfig) -> list[Any]:
    """The widget values showing cfg, in SETTINGS order."""
    values = []
    for s in SETTINGS:
        value = _get(cfg, s.key)
        values.append("\n".join(value) if isinstance(value, list) else value)
    return values


def preset_values(preset: str | None) -> list[Any]:
    return form_values(build_config({"preset": preset} if preset else {}))


def form_layer(values: list[Any]) -> dict[str, dict[str, Any]]:
    """Widget values → a nested override dict, typed like the TrainConfig defaults (Number gives floats)."""
    defaults = TrainConfig()
    layer: dict[str, dict[str, Any]] = {}
    for s, value in zip(SETTINGS, values):
        default = _get(defaults, s.key)
        if value is None or value == "" and not isinstance(default, (str, list)):
            raise ConfigError(f"the setting `{s.key}` is empty: type a value")  # run_config adds the label
        if isinstance(default, list):
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            if float(value) != int(float(value)):
                raise ConfigError(f"the setting `{s.key}` must be a whole number, got {value}")
            value = int(float(value))
        elif isinstance(default, float):
            value = float(value)
        section, name = s.key.split(".")
        layer.setdefault(section, {})[name] = value
    return layer


def extra_layer(text: str) -> dict[str, Any]:
    """The Advanced "extra settings" box: any other config key, as TOML (`[data]\\ncrop = "random"`)."""
    try:
        return tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the extra settings are not valid TOML ({e}); write e.g. [data] on one line and "
                          'crop = "random" on the next') from e
