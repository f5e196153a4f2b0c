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
    make: Callable[[Any], gr.components.Component]  # the widget, showing the given value
    advanced: bool = False


def _num(label: str, info: str = "", integer: bool = True, minimum: float | None = 0):
    return lambda value: gr.Number(value, label=label, info=info or None, precision=0 if integer else None,
                                   minimum=minimum)


def _check(label: str):
    return lambda value: gr.Checkbox(value, label=label)


def _choice(key: str, label: str):
    return lambda value: gr.Dropdown(list(CHOICES[key]), value=value, label=label)


SETTINGS = [
    Setting("training.steps", _num("Steps", "optimiser steps (used when epochs is 0)")),
    Setting("training.epochs", _num("Epochs", "0 = train for `Steps`")),
    Setting("network.rank", _num("Rank", "LoRA dimension: 4–32 for styles, 32+ for detailed characters", minimum=1)),
    Setting("network.alpha", _num("Alpha", "scale = alpha / rank; rank/2 is kohya's usual", integer=False)),
    Setting("optimizer.learning_rate", _num("Learning rate", integer=False)),
    Setting("optimizer.unet_lr", _num("UNet learning rate", "0 = the learning rate", integer=False)),
    Setting("optimizer.text_encoder_lr", _num("Text encoder learning rate", "0 = the learning rate", integer=False)),
    Setting("data.resolution", _num("Resolution", "pixels; a multiple of 64", minimum=64)),
    Setting("network.train_text_encoder", _check("Train the text encoder")),
    Setting("training.seed", _num("Seed", minimum=None)),
    # ---- Advanced --------------------------------------------------------------------------------------
    Setting("optimizer.optimizer", _choice("optimizer.optimizer", "Optimizer"), True),
    Setting("optimizer.scheduler", _choice("optimizer.scheduler", "LR scheduler"), True),
    Setting("optimizer.warmup_steps", _num("Warmup steps"), True),
    Setting("training.batch_size", _num("Batch size", minimum=1), True),
    Setting("training.grad_accum", _num("Gradient accumulation", minimum=1), True),
    Setting("training.mixed_precision", _choice("training.mixed_precision", "Mixed precision"), True),
    Setting("training.gradient_checkpointing", _check("Gradient checkpointing (less memory)"), True),
    Setting("training.attention_memory_mb", _num("Attention memory (MB, CPU)",
                                                 "bf16 on a CPU: faster steps for this much more RAM; 0 = none"), True),
    Setting("data.repeats", _num("Repeats per epoch", minimum=1), True),
    Setting("data.flip", _check("Random horizontal flip"), True),
    Setting("data.shuffle_tags", _check("Shuffle comma-separated tags"), True),
    Setting("data.keep_tokens", _num("Keep first N tags in place"), True),
    Setting("data.caption_dropout", _num("Caption dropout", "probability, 0–1", integer=False), True),
    Setting("training.noise_offset", _num("Noise offset", "0.05–0.1 for very dark/bright images", integer=False), True),
    Setting("training.min_snr_gamma", _num("Min-SNR gamma", "5 is the paper's value; 0 = off", integer=False), True),
    Setting("model.clip_skip", _num("CLIP skip", "2 for anime SD 1.x models", minimum=1), True),
    Setting("sample.every_n_steps", _num("Sample images every N steps", "0 = only at the end"), True),
    Setting("sample.prompts", lambda value: gr.Textbox(value, label="Sample prompts", info="one per line", lines=3),
            True),
    Setting("output.save_every_n_steps", _num("Save a checkpoint every N steps", "0 = only at the end"), True),
]


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
        label = s.key
        if value is None or value == "" and not isinstance(default, (str, list)):
            raise ConfigError(f"the setting `{label}` is empty: type a value")
        if isinstance(default, list):
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            if float(value) != int(float(value)):
                raise ConfigError(f"the setting `{label}` must be a whole number, got {value}")
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
