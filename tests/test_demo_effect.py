"""The demo LoRAs learn what their datasets show — measured on generated pictures, not on the loss.

Each LoRA (the striped style, the mushroom character "zorbo") is trained with presets/demo.toml on the committed
demo base model, then pictures are generated at fixed seeds for prompts the datasets do not hold, at LoRA weights
0, 0.5 and 1, and with both LoRAs stacked. The scores are pixel statistics from trainer/demo/metrics.py, checked on
rendered pictures in test_demo_world.py: the stripes / the likeness to the mushroom template must rise with the
weight from the base level to clearly above it, while the prompted colour stays.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.demo import metrics, world
from trainer.demo.evaluate import (CFG, SEEDS, STEPS, character_prompts, demo_config, pictures, style_prompts,
                                   sweep)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "demo"


@pytest.fixture(scope="module")
def one_thread():
    # Intra-op threads wait on each other on a shared CPU (4-10× slower steps here): one thread is fastest.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(dataset: str, out: Path) -> Path:
    from trainer.loop import train

    path = train(demo_config(dataset, out))
    assert path is not None and path.exists()
    return path


@pytest.fixture(scope="module")
def style_lora(tmp_path_factory, one_thread):
    return _train("demo-style", tmp_path_factory.mktemp("demo-style"))


@pytest.fixture(scope="module")
def character_lora(tmp_path_factory, one_thread):
    return _train("demo-character", tmp_path_factory.mktemp("demo-character"))


@pytest.fixture(scope="module")
def generator(one_thread):
    from trainer.generate import Generator

    gen = Generator()
    gen.load(DEMO_MODEL)
    return gen


def test_style_lora_adds_stripes_and_keeps_the_colour(style_lora, generator):
    prompts, colours = style_prompts()  # held-out (colour, shape, background) triples
    result = sweep(generator, prompts, colours, style_lora, metrics.stripe_score)
    (base, base_colour), (half, _), (full, full_colour) = result[0.0], result[0.5], result[1.0]
    print("style sweep (stripes, colour):", result)
    assert base < half < full  # monotonic in the LoRA weight
    # Rendered stripes score ≈ 0.4, flat fills ≈ 0.01; this small autoencoder's own round trip of the dataset
    # keeps 0.03-0.34 of it (green stripes nearly vanish), so 0.15 on held-out prompts is a clear style.
    assert full > base + 0.1 and full > 0.15
    # The content holds: the prompted colour is still the commonest hue, no less than without the LoRA.
    assert full_colour > 0.5 and full_colour > base_colour - 0.1


def test_character_lora_draws_the_character_and_keeps_the_colour(character_lora, generator):
    prompts, colours = character_prompts()  # "a <colour> zorbo on a <background> background"
    result = sweep(generator, prompts, colours, character_lora, metrics.character_score)
    (base, base_colour), (half, _), (full, full_colour) = result[0.0], result[0.5], result[1.0]
    print("character sweep (likeness, colour):", result)
    assert base < half < full
    # Rendered mushrooms score ≥ 0.85 against the template, other figures ≤ 0.72, and the base model's guess at
    # an unknown word about 0.6; soft-edged generated mushrooms land near 0.75.
    assert full > base + 0.08 and full > 0.7
    assert full_colour > 0.5 and full_colour > base_colour - 0.1
    # Picture by picture: with the LoRA the figure is a mushroom (of all six figures, its template fits best).
    drawn = [metrics.best_fit(im) == world.CHARACTER_SHAPE for im in pictures(generator, prompts, [(character_lora, 1.0)])]
    assert np.mean(drawn) >= 0.75, drawn


def test_stacked_loras_show_both_effects(style_lora, character_lora, generator):
    """The character in the style: "a red zorbo on a black background, zebrastyle" with both LoRAs at weight 1."""
    prompts, colours = character_prompts()
    prompts = [f"{p}, {world.STYLE_TRIGGER}" for p in prompts]
    per_image = [c for c in colours for _ in SEEDS]
    base = metrics.mean_scores(pictures(generator, prompts, []), per_image)
    both = metrics.mean_scores(pictures(generator, prompts, [(style_lora, 1.0), (character_lora, 1.0)]), per_image)
    print("stacked (without, with):", base, both)
    # Measured 0.05 → 0.15: stripes on a mushroom are fewer rows than on a square, and dark green keeps few.
    assert both["stripes"] > 2 * base["stripes"] and both["stripes"] > base["stripes"] + 0.06
    # Measured 0.61 → 0.70, and the figure fits the mushroom best in 5 of 8 pictures (1 of 8 without).
    assert both["character"] > base["character"] + 0.05 and both["drawn"] >= 0.5 > base["drawn"]
    assert both["colour"] > 0.5


def test_cli_generate_draws_what_the_python_api_draws(style_lora, generator, tmp_path):
    """The CLI contract: `python -m trainer generate --lora FILE:W` gives the Python API's picture."""
    prompt, seed = world.style_prompt("blue", "circle", "gray"), 3
    out = tmp_path / "cli.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "trainer", "generate", "--base-model", str(DEMO_MODEL),
                    "--lora", f"{style_lora}:0.7", "--prompt", prompt, "--seed", str(seed),
                    "--steps", str(STEPS), "--cfg", str(CFG), "--out", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    from trainer.generate import LoraSpec

    api = generator.generate(prompt, [LoraSpec(str(style_lora), 0.7)], seed=seed, steps=STEPS, cfg=CFG)
    diff = np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(api, np.int16))
    assert diff.max() <= 2  # the same picture, up to float rounding between thread counts
