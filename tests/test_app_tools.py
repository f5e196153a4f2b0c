"""The Gallery's Tools panel, through the Blocks' own wiring (the function each button runs, with the inputs it is
given) on tiny SD 1.x LoRAs: each tool's output is listed at once, matches a delta computed here, and refusals
are messages naming the field."""
from __future__ import annotations

import gradio as gr
import pytest
import torch
from gradio.helpers import special_args

import tiny_models
from app.folders import Folders
from app.gallery_tab import build_gallery_tab
from trainer.generate import Generator
from trainer.lora_file import read_lora


def deltas(path) -> dict[str, torch.Tensor]:
    tensors, _ = read_lora(path)
    return {k[: -len(".lora_down.weight")]: float(tensors[k.replace("lora_down.weight", "alpha")]) / t.shape[0]
            * (tensors[k.replace("lora_down", "lora_up")].double().flatten(1) @ t.double().flatten(1))
            for k, t in tensors.items() if k.endswith(".lora_down.weight")}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools-ui")
    folders = Folders.create(root / "models", root / "out")
    base = tiny_models.save_diffusers("sd1", root / "models" / "Stable-diffusion" / "tiny")
    for name, seed in (("style", 1), ("hero", 2)):
        pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=4, alpha=2.0, seed=seed)
        tiny_models.export_kohya(pipe, encoders, cfg, folders.lora_dir / f"{name}.safetensors", dtype=torch.float32)
    with gr.Blocks() as demo:
        with gr.Tab("Gallery") as tab:
            build_gallery_tab(demo, tab, folders, Generator(lora_dirs=[folders.lora_dir]))
    return folders, base, demo


def button(demo, elem_id: str):
    """(handler, input components, output components) of the click on the button with this elem_id."""
    block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    fn = next(f for f in demo.fns.values() if (block._id, "click") in f.targets)
    return fn.fn, fn.inputs, fn.outputs


def click(demo, elem_id: str, values: dict[str, object]):
    """Run a button's handler as Gradio would: inputs by elem_id (the selected LoRA, a gr.State, as "selected"),
    the rest at their defaults."""
    handler, inputs, outputs = button(demo, elem_id)
    args = [values.get("selected", "") if isinstance(c, gr.State) else values.get(c.elem_id, c.value) for c in inputs]
    calls = []
    args, progress_index, _, _ = special_args(handler, args)
    assert progress_index == 0  # Gradio hands the handler its progress bar
    args[0] = lambda fraction, desc="": calls.append((fraction, desc))
    return handler(*args), outputs, calls


def test_resize_writes_a_smaller_lora_and_lists_it_at_once(app):
    folders, _, demo = app
    src = str(folders.lora_dir / "style.safetensors")
    result, outputs, calls = click(demo, "tools-resize", {"selected": src, "tools-rank": 2})
    out = folders.lora_dir / "style-r2.safetensors"
    assert out.is_file() and calls  # progress was reported
    assert "kept" in result[0] and "style-r2" in result[0]
    table = result[outputs.index(next(o for o in outputs if getattr(o, "elem_id", None) == "lora-table"))]
    assert "style-r2" in list(table["name"])  # listed in the same response
    for name, d in deltas(src).items():
        u, s, vh = torch.linalg.svd(d)
        torch.testing.assert_close(deltas(out)[name], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-6, rtol=1e-5)


def test_refusals_name_the_field(app):
    folders, _, demo = app
    src = str(folders.lora_dir / "style.safetensors")
    with pytest.raises(gr.Error, match="select a LoRA"):
        click(demo, "tools-resize", {"selected": ""})
    with pytest.raises(gr.Error, match="Rule value is 1.5: sv_fro takes a fraction"):
        click(demo, "tools-resize", {"selected": src, "tools-method": "sv_fro", "tools-value": 1.5})
    with pytest.raises(gr.Error, match="output name"):
        click(demo, "tools-convert", {"selected": src, "tools-name": "../escape"})
    with pytest.raises(gr.Error, match="mix is empty"):
        click(demo, "tools-merge", {})
    click(demo, "tools-convert", {"selected": src, "tools-name": "taken"})
    with pytest.raises(gr.Error, match="already exists"):
        click(demo, "tools-convert", {"selected": src, "tools-name": "taken"})
    click(demo, "tools-convert", {"selected": src, "tools-name": "taken", "tools-overwrite": True})


def test_merge_uses_the_mix_with_its_unet_and_text_encoder_weights(app):
    folders, _, demo = app
    a, b = (str(folders.lora_dir / f"{n}.safetensors") for n in ("style", "hero"))
    mix = {"slot-0-lora": a, "slot-0-unet": 0.5, "slot-0-te": 2.0, "slot-1-lora": b, "slot-1-unet": -1.0,
           "slot-1-te": -1.0, "tools-name": "mixed"}
    click(demo, "tools-merge", mix)
    da, db, merged = deltas(a), deltas(b), deltas(folders.lora_dir / "mixed.safetensors")
    for name, d in merged.items():
        w = (0.5, -1.0) if name.startswith("lora_unet_") else (2.0, -1.0)
        torch.testing.assert_close(d, w[0] * da[name] + w[1] * db[name], atol=1e-6, rtol=1e-5)


def test_bake_puts_a_checkpoint_in_the_models_folder_and_offers_it(app):
    folders, base, demo = app
    a = str(folders.lora_dir / "style.safetensors")
    result, outputs, _ = click(demo, "tools-bake", {"gen-base-model": str(base), "slot-0-lora": a,
                                                     "tools-name": "tiny-style"})
    out = folders.models_dir / "Stable-diffusion" / "tiny-style"
    assert (out / "unet" / "config.json").is_file()
    assert str(out) in [path for _, path in result[1]["choices"]]  # in the base-model picker at once
    assert "tiny-style" in result[0]
