"""The command line: the contract the UI, users and tests share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_models
from trainer.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_models.save_diffusers("sd1", root / "base")
    pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=4, alpha=2.0)
    lora = tiny_models.export_kohya(pipe, encoders, cfg, root / "Lora" / "shapes.safetensors")
    return root, base, lora


def test_inspect_prints_format_family_rank_and_json(files, capsys):
    root, base, lora = files
    assert main(["inspect", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "format: kohya-lora" in text and "family: sd1" in text and "rank: 4" in text and "alpha: 2.0" in text
    assert main(["inspect", str(lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == {"unet": 192, "te": 72}
    assert info["metadata"]["ss_output_name"] == "shapes"


def test_generate_stacks_loras_and_weight_matters(files):
    root, base, lora = files
    outs = []
    for weight in ("0", "1.5"):
        out = root / f"w{weight}.png"
        assert main(["generate", "--base-model", str(base), "--lora", f"{lora}:{weight}", "--prompt", "a red circle",
                     "--seed", "3", "--steps", "3", "--out", str(out)]) == 0
        outs.append(np.asarray(Image.open(out)))
    plain = root / "plain.png"
    assert main(["generate", "--base-model", str(base), "--prompt", "a red circle", "--seed", "3", "--steps", "3",
                 "--out", str(plain)]) == 0
    assert np.array_equal(outs[0], np.asarray(Image.open(plain)))  # weight 0 is the base model
    assert not np.array_equal(outs[1], outs[0])


def test_user_errors_are_one_line_with_exit_code_2(files, capsys):
    root, base, lora = files
    assert main(["inspect", str(root / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", str(root), "--rank", "0", "--output", str(root / "x.safetensors")]) == 2
    assert "`network.rank` must be ≥ 1" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_even_when_it_is_a_value_error(monkeypatch):
    # Only the project's own errors (StudioError) and OSError are one-line messages; a library's ValueError or
    # KeyError is a bug and must reach the terminal with its traceback.
    import trainer.cli as cli

    def broken(args):
        raise ValueError("numpy says no")
    monkeypatch.setattr(cli, "cmd_inspect", broken)
    with pytest.raises(ValueError, match="numpy says no"):
        main(["inspect", "anything.safetensors"])


def test_the_module_runs_as_a_process_without_a_traceback(files):
    root, base, lora = files
    bad = root / "bad.toml"
    bad.write_text("[network]\nrnak = 8\n")
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert "unknown config key `network.rnak`" in proc.stderr and "Traceback" not in proc.stderr


def test_misleading_dependency_warnings_are_dropped():
    """transformers' "install torchvision" advice (it would replace our torch with a multi-GB CUDA build) and
    bitsandbytes' optional-kernel notice are dropped once `trainer` is imported; checked only for the messages this
    machine's packages print at all."""
    from trainer.quiet import DROPPED

    imports = "from diffusers import StableDiffusionPipeline; import bitsandbytes"
    plain = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, timeout=300)
    shown = [text for text in DROPPED.values() if text in plain.stderr]
    if not shown:
        pytest.skip("this machine's packages print neither warning")
    ours = subprocess.run([sys.executable, "-c", "import trainer; " + imports], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert not [text for text in shown if text in ours.stderr], ours.stderr
