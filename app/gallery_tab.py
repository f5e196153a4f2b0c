"""The Gallery tab: the LoRAs in the models folder, their metadata, and generation with a mix of them.

Functions first, then the layout (build_gallery_tab), then the event wiring at its end. Reading LoRA files and
generating are the engine's (trainer.lora_file.inspect_lora, trainer.generate.Generator); the Generator keeps
one base pipeline, so changing the LoRA mix never reloads the base model.
"""
from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from app.checkpoints import build_gallery_block, checkpoint_choices, runs_with_checkpoints
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders
from app.live_generation import LiveGeneration, progress_html
from app.tools_panel import ToolsPanel
from app.xy_grid_panel import build_xy_grid
from trainer.atomic import atomic_path
from trainer.generate import SAMPLERS, DoubledLoraError, Generator, LoraSpec, parse_prompt_loras, with_tagged
from trainer.lora_file import LoraFileError, inspect_lora
from trainer.lora_formats import LoraFormatError

SLOTS = 4  # LoRAs stacked at once from the pickers (more through <lora:name:w> in the prompt)
PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp")  # A1111's conventions, in its order
COLUMNS = ["name", "family", "rank", "alpha", "trigger words", "date", "format"]


# ---- the LoRA list ----------------------------------------------------------------------------------------

def preview_of(path: Path) -> Path | None:
    stem = path.with_suffix("")
    return next((Path(f"{stem}{s}") for s in PREVIEW_SUFFIXES if Path(f"{stem}{s}").is_file()), None)


def _date(info: dict, path: Path) -> str:
    meta = info.get("metadata", {})
    for key in ("ss_training_finished_at", "ss_training_started_at"):
        try:
            return dt.datetime.fromtimestamp(float(meta[key])).strftime("%Y-%m-%d %H:%M")
        except (KeyError, ValueError, OverflowError, OSError):
            pass
    if meta.get("modelspec.date"):
        return meta["modelspec.date"][:16].replace("T", " ")
    return dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


class LoraIndex:
    """inspect_lora for every file in the LoRA folder, re-read only when a file changes."""

    def __init__(self, folders: Folders):
        self.folders = folders
        self._cache: dict[Path, tuple[tuple[float, int], dict]] = {}

    def label(self, path: Path) -> str:
        return str(path.relative_to(self.folders.lora_dir).with_suffix(""))

    def entries(self) -> list[dict]:
        out = []
        for path in self.folders.list_loras():
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
            cached = self._cache.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    info = inspect_lora(path)
                except LoraFileError as e:  # listed, with the reason (one line), rather than hidden
                    kind = "unsupported" if isinstance(e, LoraFormatError) else "unreadable"
                    info = {"format": kind, "family": "?", "rank": None, "alpha": None,
                            "trigger_words": [], "metadata": {}, "error": str(e)}
                cached = (stamp, info)
                self._cache[path] = cached
            info = cached[1]
            out.append({"path": str(path), "name": self.label(path), "family": info.get("family"),
                        "rank": info.get("rank"), "alpha": info.get("alpha"),
                        "trigger words": ", ".join(info.get("trigger_words") or []), "date": _date(info, path),
                        "format": info.get("format"), "info": info, "preview": preview_of(path)})
        return out


def placeholder(folders: Folders) -> Path:
    """A grey square for LoRAs without a preview image (the gallery needs an image per item)."""
    path = folders.outputs_dir / "app-cache" / "no-preview.png"
    if not path.exists():
        with atomic_path(path) as tmp:
            Image.new("RGB", (256, 256), (200, 200, 200)).save(tmp, format="PNG")
    return path


def list_loras(index: LoraIndex):
    entries = index.entries()
    blank = placeholder(index.folders)
    items = [(str(e["preview"] or blank), e["name"]) for e in entries]
    table = pd.DataFrame([{c: e[c] for c in COLUMNS} for e in entries], columns=COLUMNS)
    # a run's checkpoints can be mixed and swept too; they are listed under their run, not among the LoRAs
    choices = [(e["name"], e["path"]) for e in entries] + checkpoint_choices(index.folders.runs_dir)
    updates = [gr.update(choices=[("(none)", "")] + choices) for _ in range(SLOTS)]
    return (items, table, [e["path"] for e in entries], gr.update(choices=choices), *updates,
            f"{len(entries)} LoRA(s) in {index.folders.lora_dir}")


def select_lora(index: LoraIndex, paths: list[str], position) -> tuple:
    """A click in the gallery (position = item) or the table (position = [row, column])."""
    row = position[0] if isinstance(position, (list, tuple)) else position
    if row is None or row >= len(paths):
        raise UserError("that LoRA is no longer listed: press Refresh")
    entry = next((e for e in index.entries() if e["path"] == paths[row]), None)
    if entry is None:
        raise UserError(f"{paths[row]} was removed: press Refresh")
    info = entry["info"]
    details = (f"**{entry['name']}** — {entry['family']} LoRA, rank {entry['rank']}, alpha {entry['alpha']}, "
               f"{entry['format']} format"
               + (f" ({info['algorithm']})" if info.get("algorithm") not in (None, entry["format"]) else "")
               + f", {entry['date']}"
               + (f"  \nTrigger words: `{entry['trigger words']}`" if entry["trigger words"] else "")
               + (f"  \n⚠ {info['error']}" if info.get("error") else ""))
    shown = {k: v for k, v in info.items() if k != "metadata"}
    shown["metadata"] = info.get("metadata", {})
    # the sweep's LoRA follows the selection: sweeping is what one does next with a LoRA just picked
    return details, shown, gr.update(value=entry["path"], visible=True), entry["path"], gr.update(value=entry["path"])


def add_to_mix(selected: str, *slot_values):
    if not selected:
        raise UserError("select a LoRA in the list first")
    slots = list(slot_values)
    if selected in slots:
        raise UserError("that LoRA is already in the mix: change its weights below")
    if "" not in slots and None not in slots:
        raise UserError(f"all {SLOTS} slots are in use: clear one, or add more with <lora:name:weight> in the prompt")
    free = next(i for i, v in enumerate(slots) if not v)
    return [gr.update(value=selected) if i == free else gr.skip() for i in range(SLOTS)]


# ---- generating -------------------------------------------------------------------------------------------

def save_picture(folders: Folders, image: Image.Image, kind: str) -> str:
    path = folders.generated_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{time.time_ns() % 1000000:06d}.png"
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return str(path)


def generation_settings(steps, cfg, width, height, seed, sampler) -> dict:
    if steps is None or not 1 <= steps <= 150:
        raise UserError(f"Steps is {steps}: use 1 to 150 (20-30 is usual)")
    if cfg is None or not 0 <= cfg <= 30:
        raise UserError(f"CFG is {cfg}: use 0 to 30 (7 is usual; 1 or less turns guidance off)")
    for label, value in (("Width", width), ("Height", height)):
        if value is not None and (value < 0 or value % 8):
            raise UserError(f"{label} is {value}: use 0 (the model's size) or a positive multiple of 8, like 512")
    if seed is None:
        raise UserError("Seed is empty: type a number, e.g. 1234")
    return dict(seed=int(seed), steps=int(steps), cfg=float(cfg), width=int(width or 0), height=int(height or 0),
                sampler=sampler)


def watch_progress(live: LiveGeneration, base: str, work, total: int, what: str):
    """(picture or gr.skip(), progress bar) while `work` runs, then the final Progress."""
    shown = None
    for p in live.run(base, work, total):
        new = p.preview is not None and p.preview is not shown
        shown = p.preview if new else shown
        yield (p.preview if new else gr.skip()), progress_html(p, what), p


def generate(folders: Folders, live: LiveGeneration, base, prompt, negative, seed, steps, cfg, width, height,
             sampler, *slots):
    if not base:
        raise UserError("pick a base model first")
    specs = []
    for i in range(SLOTS):
        path, unet_w, te_w = slots[3 * i: 3 * i + 3]
        if path:
            specs.append(LoraSpec(path, float(unet_w), float(te_w)))
    _refuse_doubles(live.gen, prompt or "", specs)
    common = generation_settings(steps, cfg, width, height, seed, sampler)
    tagged = len(parse_prompt_loras(prompt or "")[1])
    loads = live.gen.loads
    work = lambda progress: live.gen.generate(prompt or "", specs, negative or "", progress=progress, **common)  # noqa: E731
    for picture, bar, p in watch_progress(live, base, work, common["steps"], "picture"):
        yield picture, bar, gr.skip()
    if p.error is not None:
        raise p.error
    if p.phase == "cancelled":
        yield gr.skip(), bar, f"Cancelled at step {p.step} of {p.total}: no picture was saved."
        return
    loaded = " (after loading the base model)" if live.gen.loads > loads else ""
    yield (save_picture(folders, p.result, "gen"), bar,
           f"Generated in {time.time() - p.started:.1f} s{loaded} with {len(specs) + tagged} LoRA(s): "
           f"{len(specs)} from the pickers, {tagged} from the prompt. Base model loads so far: {live.gen.loads}.")


def _refuse_doubles(gen: Generator, prompt: str, specs: list[LoraSpec]) -> None:
    """A LoRA both in a picker and in a <lora:…> tag: the engine's rule (generate.with_tagged), checked before the
    generation starts and said in the Gallery's words."""
    try:
        with_tagged(prompt, specs, gen.resolve)
    except DoubledLoraError as e:
        raise UserError(f"the LoRA '{e.name}' is both in a picker and in the prompt (<lora:{e.name}:…>): "
                        "keep one of the two") from e


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.replace(";", ",").split(",") if w.strip()]
    except ValueError as e:
        raise UserError(f"the weights {text!r} are not numbers: write them like 0, 0.25, 0.5, 0.75, 1") from e
    if not weights or len(weights) > 12 or any(not -2 <= w <= 2 for w in weights):
        raise UserError("give 1 to 12 weights between -2 and 2, like 0, 0.25, 0.5, 0.75, 1")
    return weights


def sweep(folders: Folders, live: LiveGeneration, base, lora, weights_text, prompt, negative, seed, steps, cfg,
          width, height, sampler):
    if not base:
        raise UserError("pick a base model first")
    if not lora:
        raise UserError("pick the LoRA to sweep")
    weights = parse_weights(weights_text)
    common = generation_settings(steps, cfg, width, height, seed, sampler)
    work = lambda progress: live.gen.sweep(prompt or "", LoraSpec(lora, 1.0, None), weights,  # noqa: E731
                                           negative_prompt=negative or "", progress=progress, **common)[0]
    for picture, bar, p in watch_progress(live, base, work, common["steps"] * len(weights), f"{len(weights)} pictures"):
        yield picture, bar
    if p.error is not None:
        raise p.error
    if p.phase == "cancelled":
        yield gr.skip(), bar
        return
    yield save_picture(folders, p.result, "sweep"), bar


# ---- layout and wiring ------------------------------------------------------------------------------------

def build_gallery_tab(demo: gr.Blocks, tab: gr.Tab, folders: Folders, gen: Generator) -> None:
    """The Gallery tab's components and events (call inside `with demo:` and `with tab:`)."""
    index = LoraIndex(folders)
    live = LiveGeneration(gen)
    bases = folders.base_models()
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                count = gr.Markdown()
                refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-loras")
            # contain, fixed columns: one LoRA is a thumbnail, not a cropped full-width banner
            previews = gr.Gallery(columns=5, height=300, allow_preview=False, label="LoRAs", elem_id="lora-gallery",
                                  object_fit="contain", fit_columns=False)
            table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="lora-table")
        with gr.Column(scale=2):
            details = gr.Markdown("Select a LoRA to see its metadata.", elem_id="lora-details")
            with gr.Row():
                add_btn = gr.Button("Add to mix", elem_id="add-to-mix")
                download = gr.DownloadButton("Download .safetensors", visible=False, elem_id="download-lora")
            metadata = gr.JSON(label="Metadata", open=False, elem_id="lora-metadata")
            tools = ToolsPanel(folders)
    paths = gr.State([])
    selected = gr.State("")

    gr.Markdown("### Generate")
    base = gr.Dropdown(bases, value=bases[0][1], label="Base model", elem_id="gen-base-model")
    slots = []
    for i in range(SLOTS):
        with gr.Row(equal_height=True):
            slots.append(gr.Dropdown([("(none)", "")], value="", label=f"LoRA {i + 1}", scale=2,
                                     elem_id=f"slot-{i}-lora"))
            slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="UNet weight", elem_id=f"slot-{i}-unet"))
            slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Text-encoder weight", elem_id=f"slot-{i}-te"))
    prompt = gr.Textbox(label="Prompt", info="A1111's <lora:name:weight> (or <lora:name:te:unet>) works here too",
                        lines=2, elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
    with gr.Row():
        seed = gr.Number(1234, label="Seed", precision=0, elem_id="gen-seed")
        # ranges checked in generation_settings, whose messages name the field (Gradio's own name none)
        steps = gr.Number(20, label="Steps", precision=0, elem_id="gen-steps")
        cfg = gr.Number(7.0, label="CFG", elem_id="gen-cfg")
        width = gr.Number(0, label="Width", info="0 = the model's size", precision=0, step=64)
        height = gr.Number(0, label="Height", info="0 = the model's size", precision=0, step=64)
        sampler = gr.Dropdown(list(SAMPLERS), value="euler", label="Sampler", elem_id="gen-sampler")
    with gr.Row():
        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-generate", scale=1)
    gen_progress = gr.HTML(elem_id="gen-progress")
    gen_info = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="gen-info")
    image = gr.Image(label="Result", type="filepath", interactive=False, elem_id="gen-image", height=420)

    with gr.Accordion("Weight sweep: one LoRA at several weights, same seed", open=False):
        with gr.Row():
            sweep_lora = gr.Dropdown([], label="LoRA", elem_id="sweep-lora")
            weights = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="Weights", elem_id="sweep-weights")
            sweep_btn = gr.Button("Sweep", elem_id="sweep")
            sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-sweep")
        sweep_progress = gr.HTML(elem_id="sweep-progress")
        sweep_image = gr.Image(label="Sweep", type="filepath", interactive=False, elem_id="sweep-image")
    build_xy_grid(folders, live, index, base, [prompt, negative, seed, steps, cfg, width, height, sampler], slots,
                  [refresh_btn.click, tab.select, demo.load])

    run_picker = build_gallery_block(folders.runs_dir, folders.lora_dir, selected, sweep_lora)

    # ---- wiring ----
    listing = shown_as_gr_error(functools.partial(list_loras, index))
    list_outputs = [previews, table, paths, sweep_lora, *[slots[3 * i] for i in range(SLOTS)], count]
    for trigger in (refresh_btn.click, tab.select, demo.load):
        trigger(listing, None, list_outputs, show_progress="hidden")
        trigger(lambda: gr.update(choices=runs_with_checkpoints(folders.runs_dir)), None, run_picker,
                show_progress="hidden")

    @shown_as_gr_error
    def base_models_now():  # a reloaded page sees checkpoints added since the app started
        return gr.update(choices=folders.base_models())
    demo.load(base_models_now, None, base, show_progress="hidden")
    @shown_as_gr_error
    def picked(listed: list[str], evt: gr.SelectData):
        return select_lora(index, listed, evt.index)

    for source in (previews, table):
        source.select(picked, paths, [details, metadata, download, selected, sweep_lora])
    add_btn.click(shown_as_gr_error(add_to_mix), [selected, *[slots[3 * i] for i in range(SLOTS)]],
                  [slots[3 * i] for i in range(SLOTS)])
    common = [prompt, negative, seed, steps, cfg, width, height, sampler]
    # The line under the button is cleared first: after a refusal it must not describe the previous picture.
    generate_btn.click(lambda: ("", ""), None, [gen_info, gen_progress], show_progress="hidden").then(
        shown_as_gr_error(functools.partial(generate, folders, live)), [base, *common, *slots],
        [image, gen_progress, gen_info], concurrency_id="generate", concurrency_limit=1, show_progress="hidden")
    sweep_btn.click(shown_as_gr_error(functools.partial(sweep, folders, live)), [base, sweep_lora, weights, *common],
                    [sweep_image, sweep_progress], concurrency_id="generate", concurrency_limit=1,
                    show_progress="hidden")
    tools.wire(selected, base, slots, listing, list_outputs)
    for button in (cancel_btn, sweep_cancel):  # not in the "generate" group: it must run while one generates
        button.click(live.cancel, None, None, show_progress="hidden")
