"""XY grids (trainer/xy_grid.py) and `generate --grid`: each cell's mix, prompt and seed, and each cell's picture
against the single-picture path (Generator.generate alone, the same mix and seed)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tiny_models
from test_app_gallery import random_lora
from trainer.batched_mix import Picture
from trainer.cli import main
from trainer.errors import StudioError
from trainer.generate import Generator, LoraSpec
from trainer.xy_grid import grid_pictures, make_axis, parse_axis, render_grid


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    base = tiny_models.save_diffusers("sd1", root / "base")
    loras = root / "Lora"
    style = random_lora(loras / "style.safetensors", seed=1)
    hero = random_lora(loras / "hero.safetensors", seed=2)
    gen = Generator(lora_dirs=[loras])
    gen.load(base)
    return base, loras, str(style), str(hero), gen


def cells(grid: Image.Image, images, n_cols):
    """The grid's pictures, cut from its lower right corner (labels are above and to the left)."""
    w, h = images[0].size
    n_rows = len(images) // n_cols
    a = np.asarray(grid, dtype=np.int16)
    a = a[a.shape[0] - n_rows * h:, a.shape[1] - n_cols * w:]
    return [a[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(n_rows) for c in range(n_cols)]


def test_axes_set_each_cells_mix_prompt_and_seed(world):
    _, loras, style, hero, gen = world
    resolve = gen.resolve
    base = Picture("a red circle", [LoraSpec(style, 0.5, 0.2)], "blurry", 3)
    unet = parse_axis("unet:style=0, 1", resolve)
    who = parse_axis(f"lora=none, hero:0.7, {style}:-1", resolve)
    pictures = grid_pictures(base, unet, who)
    mixes = [[(str(s.path), *s.weights()) for s in p.loras] for p in pictures]
    st, he = str(loras / "style.safetensors"), str(loras / "hero.safetensors")
    assert mixes == [
        [(st, 0.0, 0.2)], [(st, 1.0, 0.2)],  # row "none": the base mix, its UNet weight set, its TE weight kept
        [(he, 0.7, 0.7), (st, 0.0, 0.2)], [(he, 0.7, 0.7), (st, 1.0, 0.2)],  # row "hero": added
        [(st, 0.0, -1.0)], [(st, 1.0, -1.0)],  # row "style:-1": the lora axis replaced style's weights first
    ]
    assert {(p.prompt, p.negative_prompt, p.seed) for p in pictures} == {("a red circle", "blurry", 3)}
    seeds = grid_pictures(base, parse_axis("seed=1,2", resolve), parse_axis("sr=red|blue|green", resolve, base.prompt))
    assert [(p.prompt, p.seed) for p in seeds] == [("a red circle", 1), ("a red circle", 2), ("a blue circle", 1),
                                                   ("a blue circle", 2), ("a green circle", 1), ("a green circle", 2)]
    prompts = parse_axis("prompt=a cat, smiling|a dog", resolve)
    assert prompts.values == ["a cat, smiling", "a dog"] and prompts.labels() == ["a cat, smiling", "a dog"]
    assert parse_axis("weight:hero=0,0.5", resolve).labels() == ["hero 0", "hero 0.5"]


@pytest.mark.parametrize("text, message", [
    ("seed", "write KIND=VALUES"), ("color=1,2", "unknown grid axis 'color'"), ("weight=0,1", "needs a LoRA"),
    ("weight:style=0,half", "'half' is not a number"), ("seed=1,2.5", "'2.5' is not an integer"),
    ("weight:style=", "has no values"), ("sr=purple|red", "'purple' .* is not in the prompt"),
    ("weight:style=0,9", "between -4 and 4"), ("lora=nothing-here", "names no file"),
])
def test_bad_axes_name_the_value_and_the_fix(world, text, message):
    gen = world[-1]
    with pytest.raises(StudioError, match=message):
        parse_axis(text, gen.resolve, "a red circle")


def test_grid_cells_equal_the_pictures_rendered_alone(world):
    _, _, style, hero, gen = world
    base = Picture("a red circle", [LoraSpec(hero, 0.6)], "", 5)
    x, y = make_axis("weight", [0, 1], style), make_axis("seed", [5, 9])
    kw = dict(steps=2, cfg=5.0)
    grid, images = render_grid(gen, base, x, y, max_batch=3, **kw)
    for picture, image, cell in zip(grid_pictures(base, x, y), images, cells(grid, images, 2)):
        alone = np.asarray(gen.generate(picture.prompt, picture.loras, seed=picture.seed, **kw), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - alone).max() <= 1  # equal floats, uint8 rounding
        assert np.array_equal(cell, np.asarray(image, dtype=np.int16))
    assert np.abs(cells(grid, images, 2)[0] - cells(grid, images, 2)[1]).mean() > 1.0  # the weight shows


def test_cli_grid_writes_the_labelled_grid(world, tmp_path, capsys):
    base, loras, style, hero, gen = world
    out = tmp_path / "grid.png"
    code = main(["generate", "--base-model", str(base), "--prompt", "a red circle", "--lora", f"{hero}:0.6",
                 "--steps", "2", "--cfg", "5", "--seed", "5", "--grid", f"weight:{style}=0,1", "--grid", "seed=5,9",
                 "--out", str(out)])
    assert code == 0 and "4 pictures in a 2×2 grid" in capsys.readouterr().out
    grid = Image.open(out).convert("RGB")
    x, y = make_axis("weight", [0, 1], style), make_axis("seed", [5, 9])
    for picture, cell in zip(grid_pictures(Picture("a red circle", [LoraSpec(hero, 0.6)], "", 5), x, y),
                             cells(grid, [Image.new("RGB", (64, 64))] * 4, 2)):
        alone = np.asarray(gen.generate(picture.prompt, picture.loras, seed=picture.seed, steps=2, cfg=5.0),
                           dtype=np.int16)
        assert np.abs(cell - alone).max() <= 1
    assert main(["generate", "--base-model", str(base), "--prompt", "a", "--grid", "seed=1", "--grid", "seed=2",
                 "--grid", "seed=3", "--out", str(out)]) == 2
    assert "give one (columns) or two" in capsys.readouterr().err


def test_a_lora_both_on_an_axis_and_in_a_prompt_tag_is_refused(world):
    """Its weights would add up: the weight axis 0, 1 would draw 0.8 and 1.8, labelled 0 and 1."""
    _, _, style, hero, gen = world
    x = make_axis("weight", [0, 1], style)
    with pytest.raises(StudioError, match=r"'style' is both in the prompt \(<lora:style:…>\) and given apart"):
        render_grid(gen, Picture("a red circle <lora:style:0.8>", [], "", 5), x, steps=1)
    with pytest.raises(StudioError, match="'style' is both"):  # one picture alone: the same rule
        gen.generate("a red circle <lora:style:0.8>", [LoraSpec(style, 1.0)], steps=1)
    # another LoRA in a tag stacks as before
    render_grid(gen, Picture("a red circle <lora:hero:0.5>", [], "", 5), x, steps=1)
