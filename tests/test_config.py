"""The config tree: TOML round trip, presets as sparse overrides, and errors that name the key and the fix."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from trainer.cli import _train_overrides, parser
from trainer.config import PRESETS_DIR, ConfigError, TrainConfig, build_config, load_config, save_config


def test_toml_round_trip(tmp_path):
    cfg = build_config({"network": {"rank": 8, "alpha": 4}, "sample": {"prompts": ["a", "b"]}})
    save_config(cfg, tmp_path / "run.toml")
    again = load_config(tmp_path / "run.toml")
    assert again == cfg
    assert isinstance(again.network.alpha, float)  # an int in TOML is accepted where a float is meant


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
def test_every_preset_is_a_valid_sparse_override(preset):
    cfg = build_config({"preset": preset})
    raw = tomllib.loads((PRESETS_DIR / f"{preset}.toml").read_text())
    defaults = TrainConfig().to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value
            # Sparse: a preset states a key only to change it.
            assert defaults[section][key] != value, f"{preset}: {section}.{key} repeats the default"


def test_every_preset_key_has_a_comment():
    for path in PRESETS_DIR.glob("*.toml"):
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                assert "#" in line or line.strip().startswith("["), f"{path.name}: {line!r} has no comment"


@pytest.mark.parametrize("layer, message", [
    ({"network": {"rnak": 8}}, "unknown config key `network.rnak`; allowed here: rank, alpha"),
    ({"netwrk": {}}, "unknown config key `netwrk`"),
    ({"network": {"rank": "eight"}}, "`network.rank` must be a whole number, got 'eight'"),
    ({"network": {"rank": 0}}, "`network.rank` must be ≥ 1 (4-32 for styles, 32+ for detailed characters), got 0"),
    ({"optimizer": {"optimizer": "sgd"}}, "`optimizer.optimizer` = 'sgd' is not one of: adamw, adamw8bit, prodigy"),
    ({"training": {"mixed_precision": True}}, "`training.mixed_precision` must be a str"),
    ({"data": {"caption_dropout": 1.5}}, "`data.caption_dropout` must be in [0, 1)"),
    ({"training": {"attention_memory_mb": -1}}, "`training.attention_memory_mb` must be ≥ 0 (0 keeps none), got -1"),
    ({"data": {"resolution": 500}}, "must be a multiple of `data.bucket_step`"),
    ({"optimizer": {"learning_rate": 0}}, "`optimizer.learning_rate` must be > 0 (1e-4 is usual for AdamW"),
    ({"training": {"steps": -5}}, "`training.steps` must be ≥ 0, got -5"),
    ({"network": {"alpha": 0}}, "`network.alpha` must be > 0 (the usual choice is rank/2 or rank), got 0.0"),
    ({"sample": {"steps": 0}}, "`sample.steps` must be ≥ 1, got 0"),
    ({"training": {"steps": 0}}, "set `training.steps` or `training.epochs` to a positive number"),
    ({"output": {"name": "my:lora"}}, "without :"),
    ({"network": 3}, "`network` is a section"),
    ({"training": {"min_timestep": 600, "max_timestep": 600}}, "`training.min_timestep` = 600 must be below"),
    ({"training": {"max_timestep": 1001}}, "`training.max_timestep` must be in [0, 1001)"),
    ({"network": {"conv_rank": -1}}, "`network.conv_rank` must be ≥ 0"),
    ({"optimizer": {"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_lr": 0.5}}, "Prodigy adapts one step size"),
])
def test_bad_values_name_the_key_and_the_fix(layer, message):
    with pytest.raises(ConfigError) as e:
        build_config(layer)
    assert message in str(e.value)


def test_every_number_has_a_range():
    """A new numeric key without a range would take any value, negative steps included: each one is listed in
    RANGES, except the seeds (any integer is a seed) and data.bucket_step (its own check: 32 or 64)."""
    from trainer.config import RANGES

    unbounded = {"training.seed", "sample.seed", "data.bucket_step"}
    cfg = TrainConfig()
    numbers = {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
               for f in dataclasses.fields(getattr(cfg, section.name))
               if type(getattr(getattr(cfg, section.name), f.name)) in (int, float)}
    assert numbers - unbounded == set(RANGES), (numbers - unbounded) ^ set(RANGES)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="available presets: .*style"):
        build_config({"preset": "nope"})


def test_layers_apply_in_order_preset_then_file_then_flags(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('preset = "style"\n[network]\nrank = 32\n')
    args = parser().parse_args(["train", "--config", str(run), "--rank", "4", "--output", "out/x.safetensors"])
    cfg = load_config(run, _train_overrides(args))
    assert cfg.network.rank == 4  # the flag wins
    assert cfg.training.steps == 1500  # from the preset
    assert cfg.output.name == "x" and Path(cfg.output.lora_dir) == Path("out")


def test_output_must_be_safetensors():
    args = parser().parse_args(["train", "--output", "x.ckpt"])
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        _train_overrides(args)


def test_bucket_range_defaults_follow_the_resolution():
    assert build_config({}).data.bucket_range() == (256, 1024)
    assert build_config({"data": {"resolution": 1024}}).data.bucket_range() == (512, 2048)
    assert build_config({"data": {"resolution": 64, "min_bucket_reso": 32}}).data.bucket_range() == (32, 128)


def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """A T4 or V100 'supports' bf16 only by emulation (torch's default check counts that): auto must pick fp16
    there, bf16 on Ampere and later, bf16 or fp32 on a CPU by its instruction set; fp16 on a CPU is refused."""
    import torch

    from trainer import precision

    cuda = torch.device("cuda")
    for native, expected in ((False, "fp16"), (True, "bf16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: n or including_emulation)
        assert precision.resolve_precision("auto", cuda) == expected
    for has, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda h=has: h)
        assert precision.resolve_precision("auto", torch.device("cpu")) == expected
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        precision.resolve_precision("fp16", torch.device("cpu"))
