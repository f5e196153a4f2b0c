"""Refusals before harm: non-finite config numbers, odd names and sample sizes, NaN in events, NaN LoRA files,
LoRAs of another size, sizes the hardware cannot hold, unwritable or full output folders, endless report lines."""
from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from trainer import preflight
from trainer.cli import main
from trainer.config import ConfigError, NetworkConfig, TrainConfig, build_config
from trainer.data.report import DatasetReport
from trainer.events import EventLog
from trainer.generate import Generator, LoraSpec
from trainer.lora_file import LoraFileError, read_lora, save_lora
from trainer.network import text_target_names, unet_target_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key,value", [("optimizer.learning_rate", math.inf), ("optimizer.learning_rate", math.nan),
                                       ("training.noise_offset", -math.inf), ("sample.cfg", math.nan)])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=f"`{key}` must be a finite number"):
        build_config({section: {name: value}})


def test_toml_inf_from_a_file_is_refused(tmp_path, capsys):
    run = tmp_path / "run.toml"
    run.write_text("[optimizer]\nlearning_rate = inf\n")
    assert main(["train", "--config", str(run), "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "`optimizer.learning_rate` must be a finite number" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["..", ".", ".hidden", " padded", "a\tb", "x" * 121])
def test_names_are_plain_file_names(name):
    with pytest.raises(ConfigError, match="output.name"):
        build_config({"output": {"name": name}})
    build_config({"output": {"name": "my style-2_v1.5"}})  # spaces, dots inside, digits: fine


def test_sample_sizes_must_be_multiples_of_8():
    with pytest.raises(ConfigError, match="`sample.width` = 7 must be a multiple of 8"):
        build_config({"sample": {"width": 7}})
    assert build_config({"sample": {"width": 64, "height": 0}}).sample.width == 64


def test_every_preset_checkpoints_on_the_clock():
    for preset in sorted(p.stem for p in (ROOT / "presets").glob("*.toml")) + [None]:
        cfg = build_config({"preset": preset} if preset else {})
        assert 0 < cfg.output.save_every_n_minutes <= 30, preset
        assert cfg.training.max_nonfinite_steps >= 1


def test_events_stay_json_with_nan_and_inf(tmp_path):
    log = EventLog(tmp_path)
    log.emit("step", step=3, loss=math.nan, lr=math.inf, nested={"g": [1.0, -math.inf]})
    line = (tmp_path / "events.jsonl").read_text().strip()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    assert record["loss"] is None and record["lr"] is None and record["nested"] == {"g": [1.0, None]}


def test_report_lines_are_capped():
    report = DatasetReport(source="d", top_tags=[("word " * 10000, 1), ("red", 3)])
    lines = report.lines()
    top = [line for line in lines if line.startswith("Top tags")][0]
    assert len(top) <= 300 and "red (3)" in top and max(map(len, lines)) <= 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    base = tiny_models.save_diffusers("sd1", root / "base")
    pipe, encoders, cfg = tiny_models.lora_pipeline("sd1")
    good = tiny_models.export_kohya(pipe, encoders, cfg, root / "good.safetensors")
    tensors, meta = read_lora(good)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    nan = save_lora(root / "nan.safetensors", {**tensors, key: torch.full_like(tensors[key], math.nan)}, meta)
    # the same names, every layer 10× wider: a LoRA made for a bigger model of the same family
    wide = save_lora(root / "wide.safetensors", {
        k: torch.zeros(v.shape[0], v.shape[1] * 10, *v.shape[2:], dtype=v.dtype) if k.endswith("lora_down.weight")
        else v for k, v in tensors.items()}, meta)
    return root, base, good, nan, wide


def test_inspect_reports_non_finite_tensors(tiny, capsys):
    root, base, good, nan, wide = tiny
    assert main(["inspect", str(good)]) == 0
    assert "NOT USABLE" not in capsys.readouterr().out
    assert main(["inspect", str(nan)]) == 1
    assert "NOT USABLE: 1 tensors hold NaN or inf" in capsys.readouterr().out
    assert main(["inspect", str(nan), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["non_finite"]) == 1


def test_generate_refuses_nan_and_misfit_loras_and_stays_usable(tiny, capsys):
    root, base, good, nan, wide = tiny
    gen = Generator()
    gen.load(base)
    plain = np.asarray(gen.generate("a red circle", [], steps=2, seed=1))
    with pytest.raises(LoraFileError, match="nan.safetensors holds NaN or inf weights"):
        gen.set_loras([LoraSpec(str(nan))])
    with pytest.raises(LoraFileError, match="wide.safetensors does not fit the base model base"):
        gen.set_loras([LoraSpec(str(wide))])
    assert np.array_equal(np.asarray(gen.generate("a red circle", [], steps=2, seed=1)), plain)
    code = main(["generate", "--base-model", str(base), "--lora", str(nan), "--prompt", "x", "--steps", "1",
                 "--out", str(root / "x.png")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("error: nan.safetensors") and not (root / "x.png").exists()
    main(["generate", "--base-model", str(base), "--lora", str(wide), "--prompt", "x", "--steps", "1",
          "--out", str(root / "x.png")])
    err = capsys.readouterr().err
    assert "size mismatch" not in err and err.splitlines()[-1].startswith("error: wide.safetensors does not fit")


def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(preflight.PreflightError, match="is not writable"):
        preflight.check_writable(blocker / "Lora", "output folder")
    preflight.check_writable(tmp_path / "fine" / "Lora", "output folder")


def test_free_space_is_checked_against_the_runs_needs(tmp_path, monkeypatch):
    cfg = TrainConfig()
    params = 3_000_000  # SD 1.5 at rank 16: ~3M LoRA parameters
    need_run, need_out = preflight.space_needed(params, cfg)
    # independent count: 4 checkpoints of fp32 weights + 2 Adam moments + an fp16 copy, and the export twice
    assert need_run >= 4 * params * (4 * 3 + 2) and need_out >= 2 * params * 2
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, need_run + need_out - 1))
    with pytest.raises(preflight.PreflightError, match="not enough free space"):
        preflight.check_space(tmp_path / "run", tmp_path / "Lora", params, cfg)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, need_run + need_out))
    preflight.check_space(tmp_path / "run", tmp_path / "Lora", params, cfg)


def test_rank_and_clip_skip_are_checked_against_the_model():
    pipe = tiny_models.pipeline("sd1")
    targets = [(n, pipe.unet.get_submodule(n)) for n in unet_target_names(pipe.unet)]
    targets += [(n, pipe.text_encoder.get_submodule(n)) for n in text_target_names(pipe.text_encoder)]
    widths = [min(m.weight.shape[:2]) for _, m in targets]
    preflight.check_rank(min(widths), targets)
    with pytest.raises(preflight.PreflightError, match=f"choose a rank ≤ {min(widths)}"):
        preflight.check_rank(min(widths) + 1, targets)
    # LoCon: network.conv_rank against the 3x3 convolutions alone, named as such in the message.
    net = NetworkConfig(rank=min(widths), conv_rank=1)
    preflight.check_ranks(net, pipe.unet, [pipe.text_encoder])
    convs = [m for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and ("resnets" in n or "samplers" in n)]
    net.conv_rank = min(min(m.weight.shape[:2]) for m in convs) + 1
    with pytest.raises(preflight.PreflightError, match="`network.conv_rank` = "):
        preflight.check_ranks(net, pipe.unet, [pipe.text_encoder])
    layers = pipe.text_encoder.config.num_hidden_layers
    preflight.check_clip_skip(layers - 1, [pipe.text_encoder])
    with pytest.raises(preflight.PreflightError, match="`model.clip_skip` = 100"):
        preflight.check_clip_skip(100, [pipe.text_encoder])


def test_memory_estimate_refuses_absurd_sizes_only(monkeypatch):
    pipe = tiny_models.pipeline("sd1")
    cpu = torch.device("cpu")
    monkeypatch.setattr(preflight, "available_memory", lambda device: 8 * 2**30)
    preflight.check_memory(build_config({"data": {"resolution": 1024}, "training": {"batch_size": 8}}),
                           pipe.unet, pipe.vae, cpu, 4)
    for layer in ({"data": {"resolution": 65536}}, {"training": {"batch_size": 100000}}):
        with pytest.raises(preflight.PreflightError, match="GB are available"):
            preflight.check_memory(build_config(layer), pipe.unet, pipe.vae, cpu, 4)
    # the real SD 1.5 topology at its usual size fits in 8 GB by the estimate (a floor, not a forecast)
    sd15 = namedtuple("M", "config")(namedtuple("C", "block_out_channels")([320, 640, 1280, 1280]))
    preflight.check_memory(build_config({"data": {"resolution": 512}}), sd15, pipe.vae, cpu, 4)
