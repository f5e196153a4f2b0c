"""`python -m trainer export RUN_DIR [--step N] --out FILE`: a checkpoint exported gives the same file a run
would have written at that step; a missing step or a non-finite checkpoint is refused in one line."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import tiny_models
from trainer import loop
from trainer.checkpoint import checkpoint_dir
from trainer.cli import main
from trainer.config import build_config
from trainer.lora_file import inspect_lora, read_lora
from trainer.locks import output_lock


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny_models.save_diffusers("sd1", root / "base")
    (root / "data").mkdir()
    for i, colour in enumerate(["red", "blue"]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=colour)
        im.save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {colour} circle")

    def cfg(name):
        return build_config({
            "model": {"base_model": str(root / "base")},
            "data": {"dataset": str(root / "data"), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
            "network": {"rank": 4, "alpha": 4.0}, "training": {"steps": 4, "mixed_precision": "no", "seed": 3},
            "sample": {"steps": 1},
            "output": {"name": name, "lora_dir": str(root / "loras"), "run_dir": str(root / "runs" / name),
                       "save_every_n_steps": 2, "save_precision": "fp32"}})

    straight = loop.train(cfg("straight"))

    assert loop.train(cfg("stopped"), stop=loop.StopRequested(at_step=2)) is None
    return root, straight, root / "runs" / "stopped", root / "runs" / "straight"


def test_exporting_a_checkpoint_gives_the_file_the_run_wrote(runs, capsys):
    root, straight, stopped, straight_dir = runs
    out = root / "exported" / "again.safetensors"
    # the uninterrupted run's own step-2 checkpoint, exported, equals the run stopped at step 2, exported
    assert main(["export", str(straight_dir), "--step", "2", "--out", str(out)]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    other = root / "exported" / "stopped.safetensors"
    assert main(["export", str(stopped), "--out", str(other)]) == 0
    a, meta = read_lora(out)
    b, _ = read_lora(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and they are not the final weights: step 2 of 4
    final, _ = read_lora(straight)
    assert any(not torch.equal(a[k], final[k]) for k in a if k.endswith("lora_up.weight"))
    info = inspect_lora(out)
    assert info["format"] == "kohya-lora" and info["family"] == "sd1" and info["rank"] == 4
    assert meta["ss_output_name"] == "again" and meta["ss_steps"] == "2"
    assert not list(out.parent.glob(".*tmp*"))


def test_missing_step_and_folder_are_one_line_errors(runs, capsys):
    root, straight, stopped, straight_dir = runs
    assert main(["export", str(straight_dir), "--step", "3", "--out", str(root / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 3; its checkpoints are at steps 2" in err and err.count("\n") == 1
    assert main(["export", str(root / "data"), "--out", str(root / "x.safetensors")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert not (root / "x.safetensors").exists()


def test_non_finite_checkpoint_is_never_exported(runs, tmp_path, capsys):
    root, straight, stopped, straight_dir = runs
    import shutil

    bad_run = tmp_path / "bad"
    shutil.copytree(stopped, bad_run)
    weights = checkpoint_dir(bad_run, 2) / "lora.safetensors"
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], math.nan)
    save_file(tensors, str(weights))
    out = tmp_path / "bad.safetensors"
    assert main(["export", str(bad_run), "--out", str(out)]) == 2
    assert "holds non-finite weights" in capsys.readouterr().err and not out.exists()


def test_an_output_another_process_writes_is_refused(runs, capsys):
    root, straight, stopped, straight_dir = runs
    out = root / "busy.safetensors"
    with output_lock(out):
        assert main(["export", str(stopped), "--out", str(out)]) == 2
    assert "is in use by another training" in capsys.readouterr().err and not out.exists()
