"""The Gallery's XY grid (app/xy_grid_panel.py) through the real engine on a tiny SD 1.x model: the handler's
grid holds, cell by cell, the pictures Generate makes alone with the same mix and seed; refusals name the fix."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app import xy_grid_panel as xg
from app.errors import UserError
from app.gallery_tab import build_gallery_tab
from test_app_gallery import world  # noqa: F401 - the module's fixture: tiny base, LoRAs style and chars/hero
from trainer.generate import LoraSpec

COMMON = dict(prompt="a red circle", negative="", seed=7, steps=2, cfg=5.0, width=0, height=0, sampler="euler")


def slots(*specs):
    out = []
    for i in range(4):
        out += list(specs[i]) if i < len(specs) else ["", 1.0, 1.0]
    return out


def run(folders, live, base, x, y, pickers):
    c = COMMON
    outs = list(xg.xy_grid(folders, live, base, *x, *y, c["prompt"], c["negative"], c["seed"], c["steps"], c["cfg"],
                           c["width"], c["height"], c["sampler"], *pickers))
    return outs[-1][0]


def test_the_grid_holds_the_pictures_generate_makes_alone(world):  # noqa: F811
    folders, base, live = world
    gen = live.gen
    style, hero = str(folders.lora_dir / "style.safetensors"), str(folders.lora_dir / "chars" / "hero.safetensors")
    path = run(folders, live, base, ("LoRA weight", [style], "0, 1"), ("Seeds", [], "7, 8"),
               slots((hero, 0.5, 0.5)))
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    cells = [(seed, w) for seed in (7, 8) for w in (0.0, 1.0)]
    h = w_ = 64
    grid = grid[grid.shape[0] - 2 * h:, grid.shape[1] - 2 * w_:]
    pictures = []
    for k, (seed, weight) in enumerate(cells):
        alone = np.asarray(gen.generate("a red circle", [LoraSpec(hero, 0.5, 0.5), LoraSpec(style, weight)],
                                        seed=seed, steps=2, cfg=5.0), dtype=np.int16)
        cell = grid[(k // 2) * h:(k // 2 + 1) * h, (k % 2) * w_:(k % 2 + 1) * w_]
        assert np.abs(cell - alone).max() <= 1  # one batched call: equal floats up to uint8 rounding
        pictures.append(cell)
    assert np.abs(pictures[0] - pictures[1]).mean() > 1.0 and np.abs(pictures[0] - pictures[2]).mean() > 1.0
    # LoRAs against each other, rows left out: one row; (none) is the pickers' mix alone
    path = run(folders, live, base, ("LoRAs", ["", style], "0.8"), (xg.NONE, [], ""), slots())
    row = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)[-h:]
    plain = np.asarray(gen.generate("a red circle", [], seed=7, steps=2, cfg=5.0), dtype=np.int16)
    assert np.abs(row[:, -2 * w_:-w_] - plain).max() <= 1


@pytest.mark.parametrize("x, y, message", [
    (("LoRA weight", [], "0, 1"), (xg.NONE, [], ""), "Columns: a LoRA weight axis varies one LoRA"),
    (("Seeds", [], "1, two"), (xg.NONE, [], ""), "Columns: the seed axis' value 'two' is not an integer"),
    (("Seeds", [], "1"), ("LoRAs", [], ""), "Rows: pick the LoRAs to compare"),
    (("Seeds", [], ", ".join(map(str, range(11)))), ("Seeds", [], ", ".join(map(str, range(10)))),
     "the grid has 110 pictures: make it at most 100"),
    (("Prompt search/replace", [], "blue|green"), (xg.NONE, [], ""), "'blue' .* is not in the prompt"),
])
def test_refusals_name_the_axis_and_the_fix(world, x, y, message):  # noqa: F811
    folders, base, live = world
    with pytest.raises(UserError, match=message):
        run(folders, live, base, x, y, slots())


def test_the_gallery_tab_has_the_grid_panel(world):  # noqa: F811
    import gradio as gr

    folders, base, live = world
    with gr.Blocks() as demo:
        with gr.Tab("Gallery") as tab:
            build_gallery_tab(demo, tab, folders, live.gen)
    ids = {c.get("props", {}).get("elem_id") for c in demo.get_config_file()["components"]}
    assert {"grid-x-kind", "grid-x-loras", "grid-y-values", "make-grid", "cancel-grid", "grid-image"} <= ids
