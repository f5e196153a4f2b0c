"""The Gallery's XY grid: rows and columns of a LoRA's weights, LoRAs, prompts or seeds, all in batched calls.

The engine is trainer/xy_grid.py (the CLI's `generate --grid` too); each picture has its own LoRA mix, starting from
the mix in the Generate pickers, and all pictures are rendered together (trainer/batched_mix.py). Functions first,
then the layout and its wiring (build_xy_grid, called by app/gallery_tab.py).
"""
from __future__ import annotations

import functools

import gradio as gr

from app.errors import UserError, shown_as_gr_error
from app.folders import Folders
from app.live_generation import LiveGeneration
from trainer.batched_mix import Picture
from trainer.generate import LoraSpec
from trainer.xy_grid import GridError, make_axis, render_grid

# The UI's names of trainer.xy_grid's axis kinds
KINDS = {"LoRA weight": "weight", "LoRA UNet weight": "unet", "LoRA text-encoder weight": "te", "LoRAs": "lora",
         "Prompts": "prompt", "Prompt search/replace": "sr", "Seeds": "seed"}
NONE = "(none)"
MAX_PICTURES = 100  # a grid is one job: more is an hour's wait on a CPU


def ui_axis(kind_label: str, loras: list[str] | None, values_text: str, prompt: str, which: str):
    """The fields of one axis → a trainer.xy_grid.Axis (None for the rows' "(none)")."""
    if kind_label == NONE:
        return None
    if kind_label not in KINDS:
        raise UserError(f"{which}: unknown kind {kind_label!r}; pick one of {', '.join(KINDS)}")
    kind, loras, text = KINDS[kind_label], list(loras or []), (values_text or "").strip()
    try:
        if kind in ("weight", "unet", "te"):
            if len([p for p in loras if p]) != 1:
                raise UserError(f"{which}: a {kind_label} axis varies one LoRA: pick exactly one in its LoRA list")
            return make_axis(kind, [v for v in text.split(",") if v.strip()], next(p for p in loras if p))
        if kind == "lora":
            if not loras:
                raise UserError(f"{which}: pick the LoRAs to compare in its LoRA list ((none) for a column without)")
            weight = _weight(text, which)
            return make_axis(kind, [LoraSpec(p, weight) if p else None for p in loras])
        values = [v.strip() for v in text.split("|" if kind in ("prompt", "sr") else ",") if v.strip()]
        return make_axis(kind, values, prompt=prompt)
    except GridError as e:
        raise UserError(f"{which}: {e}") from None


def _weight(text: str, which: str) -> float:
    try:
        return float(text) if text else 1.0
    except ValueError:
        raise UserError(f"{which}: for LoRAs the values field is one weight for all of them (e.g. 0.8), "
                        f"not {text!r}") from None


def xy_grid(folders: Folders, live: LiveGeneration, base, x_kind, x_loras, x_values, y_kind, y_loras, y_values,
            prompt, negative, seed, steps, cfg, width, height, sampler, *slots):
    """The grid handler: yields (picture or gr.skip(), progress bar) while it runs, then the saved grid."""
    from app.gallery_tab import SLOTS, generation_settings, save_picture, watch_progress

    if not base:
        raise UserError("pick a base model first")
    x = ui_axis(x_kind, x_loras, x_values, prompt or "", "Columns")
    if x is None:
        raise UserError("Columns: pick what the columns vary")
    y = ui_axis(y_kind, y_loras, y_values, prompt or "", "Rows")
    count = len(x.values) * (len(y.values) if y is not None else 1)
    if count > MAX_PICTURES:
        raise UserError(f"the grid has {count} pictures: make it at most {MAX_PICTURES} (fewer values per axis)")
    specs = [LoraSpec(slots[3 * i], float(slots[3 * i + 1]), float(slots[3 * i + 2]))
             for i in range(SLOTS) if slots[3 * i]]
    common = generation_settings(steps, cfg, width, height, seed, sampler)
    picture = Picture(prompt or "", specs, negative or "", common.pop("seed"))
    work = lambda progress: render_grid(live.gen, picture, x, y, progress=progress, **common)[0]  # noqa: E731
    for preview, bar, p in watch_progress(live, base, work, common["steps"] * count, f"{count} pictures"):
        yield preview, bar
    if p.error is not None:
        raise p.error
    if p.phase == "cancelled":
        yield gr.skip(), bar
        return
    yield save_picture(folders, p.result, "grid"), bar


def lora_choices(index) -> list[tuple[str, str]]:
    return [(e["name"], e["path"]) for e in index.entries()]


# ---- layout and wiring ------------------------------------------------------------------------------------

def build_xy_grid(folders: Folders, live: LiveGeneration, index, base, common: list, slots: list,
                  listing_triggers: list) -> None:
    """The XY grid accordion (call inside the Gallery's layout). common: the Generate section's prompt, negative,
    seed, steps, cfg, width, height and sampler components; slots: its pickers (path, UNet, TE per slot)."""
    with gr.Accordion("XY grid: rows and columns of LoRA weights, LoRAs, prompts or seeds (one batched call)",
                      open=False):
        gr.Markdown("Each picture starts from the mix in the pickers above; weights are comma-separated "
                    "(`0, 0.5, 1`), prompts `|`-separated (search/replace: the first value is replaced in the "
                    "prompt by each value), seeds comma-separated. For **LoRAs**, pick several (and (none)); "
                    "the values field is their weight.")
        fields = {}
        for which, default_kind, default_values in (("x", "LoRA weight", "0, 0.5, 1"), ("y", NONE, "")):
            with gr.Row():
                kinds = list(KINDS) if which == "x" else [NONE, *KINDS]
                label = "Columns" if which == "x" else "Rows"
                fields[which] = (
                    gr.Dropdown(kinds, value=default_kind, label=f"{label}: vary", elem_id=f"grid-{which}-kind"),
                    gr.Dropdown([(NONE, "")], value=[], multiselect=True, label="LoRA(s)",
                                elem_id=f"grid-{which}-loras"),
                    gr.Textbox(default_values, label="Values", elem_id=f"grid-{which}-values"))
        with gr.Row():
            run_btn = gr.Button("Make grid", elem_id="make-grid")
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-grid")
        progress = gr.HTML(elem_id="grid-progress")
        result = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="grid-image")

    @shown_as_gr_error
    def choices_now():
        choices = [(NONE, ""), *lora_choices(index)]
        return gr.update(choices=choices), gr.update(choices=choices)
    for trigger in listing_triggers:
        trigger(choices_now, None, [fields["x"][1], fields["y"][1]], show_progress="hidden")
    run_btn.click(shown_as_gr_error(functools.partial(xy_grid, folders, live)),
                  [base, *fields["x"], *fields["y"], *common, *slots], [result, progress],
                  concurrency_id="generate", concurrency_limit=1, show_progress="hidden")
    cancel.click(live.cancel, None, None, show_progress="hidden")
