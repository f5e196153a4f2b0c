"""The Gallery tab's logic through the real engine on a tiny SD 1.x model: LoRA listing, stacking from the
pickers and from A1111's <lora:name:w> prompt syntax (the same pixels either way), one base-model load, sweeps,
and a family mismatch shown as a message naming both families."""
from __future__ import annotations

import time

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from app import gallery_tab as g
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders
from app.live_generation import LiveGeneration
from trainer.config import TrainConfig
from trainer.generate import Generator
from trainer.lora_file import save_lora, text_encoder_prefixes, to_kohya
from trainer.network import add_lora, lora_state

COMMON = dict(negative="", seed=7, steps=2, cfg=5.0, width=0, height=0, sampler="euler")


def random_lora(path, family="sd1", seed=1, metadata=None):
    """A kohya LoRA for the tiny model of `family` with non-zero up weights, as after training."""
    pipe = tiny_models.pipeline(family)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    net = TrainConfig().network
    net.rank, net.alpha = 4, 4.0
    add_lora(pipe.unet, encoders, net)
    gen = torch.Generator().manual_seed(seed)
    for model in [pipe.unet, *encoders]:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
    parts = {"lora_unet_": lora_state(pipe.unet),
             **{pre: lora_state(te) for pre, te in zip(text_encoder_prefixes(len(encoders)), encoders)}}
    version = "sdxl_base_v1-0" if family == "sdxl" else "sd_v1"
    return save_lora(path, to_kohya(parts, net.alpha, torch.float32),
                     {"ss_base_model_version": version, **(metadata or {})})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    base = tiny_models.save_diffusers("sd1", root / "base")
    folders = Folders.create(root / "models", root / "out")
    random_lora(folders.lora_dir / "style.safetensors", seed=1,
                metadata={"modelspec.trigger_phrase": "sks style", "ss_training_finished_at": "1700000000"})
    random_lora(folders.lora_dir / "chars" / "hero.safetensors", seed=2)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folders.lora_dir / "style.preview.png")
    return folders, str(base), LiveGeneration(Generator(lora_dirs=[folders.lora_dir]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def slots(*specs):
    """Picker values for generate(): (path, unet, te) per used slot, the rest empty."""
    flat = [v for spec in specs for v in spec]
    return flat + ["", 1.0, 1.0] * (g.SLOTS - len(specs))


def run(world, prompt, *specs):
    folders, base, gen = world
    c = COMMON
    *_, (path, bar, info) = g.generate(folders, gen, base, prompt, c["negative"], c["seed"], c["steps"], c["cfg"],
                                       c["width"], c["height"], c["sampler"], *slots(*specs))
    assert 'data-phase="done"' in bar
    return pixels(path), info


def test_the_list_shows_family_rank_trigger_preview_and_unreadable_files(world):
    folders, _, _ = world
    (folders.lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    try:
        entries = {e["name"]: e for e in g.LoraIndex(folders).entries()}
    finally:
        (folders.lora_dir / "broken.safetensors").unlink()
    assert set(entries) == {"style", "chars/hero", "broken"}
    style = entries["style"]
    assert (style["family"], style["rank"], style["alpha"]) == ("sd1", 4, 4.0)
    assert style["trigger words"] == "sks style" and style["preview"] == folders.lora_dir / "style.preview.png"
    assert style["date"].startswith("2023-11-1")  # from ss_training_finished_at, not the file's mtime
    assert entries["chars/hero"]["preview"] is None
    assert entries["broken"]["format"] == "unreadable" and "broken.safetensors" in entries["broken"]["info"]["error"]
    index = g.LoraIndex(folders)
    paths = [e["path"] for e in index.entries()]
    *_, picked, sweep = g.select_lora(index, paths, paths.index(style["path"]))
    assert picked == style["path"] and sweep["value"] == style["path"]  # the sweep follows the selection


@pytest.fixture(scope="module")
def plain(world):
    return run(world, "a red circle")[0]


def test_prompt_tags_and_pickers_stack_the_same_loras(world, plain):
    folders, _, gen = world
    style, hero = str(folders.lora_dir / "style.safetensors"), str(folders.lora_dir / "chars" / "hero.safetensors")
    picked, info = run(world, "a red circle", (style, 0.8, 0.8), (hero, -0.5, 0.3))
    assert "2 LoRA(s)" in info
    # A1111: <lora:name:w> is one weight for both parts; <lora:name:te:unet> gives them separately.
    # One from the prompt, one from a picker: the same mix as both from the pickers.
    mixed, info = run(world, "a red circle <lora:chars/hero:0.3:-0.5>", (style, 0.8, 0.8))
    assert "2 LoRA(s): 1 from the pickers, 1 from the prompt" in info  # was "0 LoRA(s)" for prompt tags
    assert np.abs(picked - plain).mean() > 1.0, "the LoRAs change the picture"
    assert np.array_equal(mixed, picked)
    again, info = run(world, "a red circle")
    assert np.array_equal(again, plain), "dropping the LoRAs gives the base model's picture back"
    assert gen.gen.loads == 1 and "Base model loads so far: 1" in info


def test_the_sweep_grid_holds_the_single_generations(world, plain):
    folders, base, gen = world
    style = str(folders.lora_dir / "style.safetensors")
    c = COMMON
    *_, (path, bar) = g.sweep(folders, gen, base, style, "0, 1", "a red circle", c["negative"], c["seed"], c["steps"],
                              c["cfg"], c["width"], c["height"], c["sampler"])
    assert f'data-step="{2 * c["steps"]}" data-total="{2 * c["steps"]}"' in bar  # steps counted across pictures
    grid = pixels(path)
    zero = plain
    one, _ = run(world, "a red circle <lora:style:1>")
    h, w, _ = zero.shape
    assert grid.shape[1] == 2 * w
    band = grid.shape[0] - h  # the label strip above the pictures
    # the sweep is one batched call (trainer/batched_mix.py): the same floats up to uint8 rounding
    assert np.abs(grid[band:, :w] - zero).max() <= 1 and np.abs(grid[band:, w:] - one).max() <= 1
    assert np.abs(one - zero).mean() > 1.0
    with pytest.raises(UserError, match="not numbers"):
        g.parse_weights("0, half")
    with pytest.raises(UserError, match="between -2 and 2"):
        g.parse_weights("0, 3")


def test_a_lora_of_another_family_is_a_message_naming_both(world, tmp_path):
    folders, _, gen = world
    xl = random_lora(folders.lora_dir / "xl-style.safetensors", family="sdxl")
    try:
        with pytest.raises(gr.Error) as err:
            shown_as_gr_error(run)(world, "a cat", (str(xl), 1.0, 1.0))
    finally:
        xl.unlink()
    message = str(err.value.message)
    assert "sdxl" in message and "sd1" in message and "xl-style.safetensors" in message
    assert "Traceback" not in message
    style = str(folders.lora_dir / "style.safetensors")
    with pytest.raises(gr.Error, match="both in a picker and in the prompt"):
        shown_as_gr_error(run)(world, "a cat <lora:style:0.5>", (style, 1.0, 1.0))
    with pytest.raises(gr.Error, match="names no file"):
        shown_as_gr_error(run)(world, "a cat <lora:missing:1>")


def test_add_to_mix_fills_the_first_free_slot(world):
    updates = g.add_to_mix("/loras/b.safetensors", "/loras/a.safetensors", "", "", "")
    assert updates[1]["value"] == "/loras/b.safetensors" and updates[0] == gr.skip()
    with pytest.raises(UserError, match="already in the mix"):
        g.add_to_mix("/loras/a.safetensors", "/loras/a.safetensors", "", "", "")
    with pytest.raises(UserError, match="all 4 slots"):
        g.add_to_mix("/e", "/a", "/b", "/c", "/d")
    with pytest.raises(UserError, match="select a LoRA"):
        g.add_to_mix("", "", "", "", "")


def test_cancel_stops_a_generation_in_progress_and_previews_come_meanwhile(world):
    folders, base, live = world
    slow = []

    def work(progress):  # the real engine, slowed down per step so that Cancel lands in the middle
        def each(step, total, latents):
            time.sleep(0.05)
            slow.append(step)
            return progress(step, total, latents)
        return live.gen.generate("a red circle", [], steps=40, cfg=5.0, progress=each)

    snapshots = []
    for p in live.run(base, work, total=40):
        snapshots.append((p.phase, p.step, p.preview))
        if p.step >= 3:
            live.cancel()
    assert p.phase == "cancelled" and p.result is None and p.step < 40 and slow[-1] == p.step
    assert 'data-phase="cancelled"' in g.progress_html(p) and f"Cancelled at step {p.step} of 40" in g.progress_html(p)
    previews = [pv for _, _, pv in snapshots if pv is not None]
    assert previews and previews[-1].size == (256, 256)
    # the next generation is not cancelled by the old flag
    *_, last = live.run(base, lambda cb: live.gen.generate("a red circle", [], steps=2, cfg=5.0, progress=cb), 2)
    assert last.phase == "done" and last.result is not None
