"""The Gallery's Tools panel on the selected LoRA: resize it, convert it to a plain LoRA, merge the current mix into
one file, bake the mix into a checkpoint in the models folder. The work is the engine's (trainer.tools, the same
functions as `python -m trainer resize | merge | bake`); a new LoRA is listed at once, a baked model is offered in
the base-model picker at once.

Functions first, then the layout (ToolsPanel.__init__), then the wiring (ToolsPanel.wire).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.errors import UserError, shown_as_gr_error
from app.folders import Folders, safe_folder_name
from trainer.errors import StudioError
from trainer.tools import RankRule, bake, merge, parse_dynamic, resize

DYNAMIC = ["fixed rank", "sv_fro", "sv_ratio", "sv_cumulative"]


def _reporter(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def _stem(name: str, default: str) -> str:
    return safe_folder_name((name or "").strip() or default, "output name")


def _lora_out(folders: Folders, name: str, default: str) -> Path:
    return folders.lora_dir / f"{_stem(name, default)}.safetensors"


def _need_selected(selected: str) -> Path:
    if not selected:
        raise UserError("select a LoRA in the list first")
    return Path(selected)


def mix_of(slot_values) -> list[tuple[str, tuple[float, float]]]:
    """The pickers' (file, UNet weight, text-encoder weight) triples → the mix, empty pickers left out."""
    mix = []
    for i in range(0, len(slot_values), 3):
        path, unet_w, te_w = slot_values[i: i + 3]
        if path:
            mix.append((path, (float(unet_w), float(te_w))))
    if not mix:
        raise UserError("the mix is empty: put LoRAs in the pickers under Generate first")
    return mix


def resize_selected(folders: Folders, selected, rank, method, value, name, overwrite, progress=None):
    src = _need_selected(selected)
    if rank is None or int(rank) < 1:
        raise UserError(f"Rank is {rank}: give a whole number of 1 or more (the largest rank with a dynamic rule)")
    if method == DYNAMIC[0]:
        rule, suffix = RankRule(int(rank)), f"r{int(rank)}"
    else:
        try:
            rule = parse_dynamic(f"{method}:{value}", int(rank))
        except StudioError:  # parse_dynamic's message names the CLI flag; this one names the field
            allowed = "a number above 1, e.g. 4" if method == "sv_ratio" else "a fraction above 0, at most 1, e.g. 0.9"
            raise UserError(f"Rule value is {value}: {method} takes {allowed}") from None
        suffix = f"{method}-{rule.value:g}"
    return resize(src, _lora_out(folders, name, f"{src.stem}-{suffix}"), rule, overwrite=bool(overwrite),
                  progress=_reporter(progress) if progress else None)


def convert_selected(folders: Folders, selected, name, overwrite, progress=None):
    src = _need_selected(selected)
    return merge([(src, 1.0)], _lora_out(folders, name, f"{src.stem}-lora"), overwrite=bool(overwrite),
                 progress=_reporter(progress) if progress else None)


def merge_mix(folders: Folders, name, rank, overwrite, *slot_values, progress=None):
    mix = mix_of(slot_values)
    rank = int(rank) if rank else None
    default = "-".join(Path(p).stem for p, _ in mix)[:60] + "-merged"
    return merge(mix, _lora_out(folders, name, default), rank=rank, overwrite=bool(overwrite),
                 progress=_reporter(progress) if progress else None)


def bake_mix(folders: Folders, base, name, overwrite, *slot_values, progress=None):
    """Into models/Stable-diffusion: a .safetensors in the base's layout when the base is one, else a diffusers
    folder."""
    if not base:
        raise UserError("pick a base model under Generate first")
    mix = mix_of(slot_values)
    base = Path(base)
    stem = _stem(name, f"{base.stem}-" + "-".join(Path(p).stem for p, _ in mix)[:60])
    folder = folders.models_dir / "Stable-diffusion"
    single = base.is_file() and base.suffix.lower() == ".safetensors"
    out = folder / (f"{stem}.safetensors" if single else stem)
    return bake(base, mix, out, overwrite=bool(overwrite), progress=_reporter(progress) if progress else None)


def report(result) -> str:
    return "\n".join(result.lines)


class ToolsPanel:
    """Built inside the Gallery's right-hand column; wired once the mix pickers exist."""

    def __init__(self, folders: Folders):
        self.folders = folders
        with gr.Accordion("Tools for the selected LoRA and the mix", open=False, elem_id="lora-tools"):
            with gr.Row():
                self.name = gr.Textbox(label="Output name", placeholder="(a name made from the inputs)",
                                       elem_id="tools-name", scale=2)
                self.overwrite = gr.Checkbox(False, label="Replace an existing file of that name",
                                             elem_id="tools-overwrite")
            with gr.Row():
                self.rank = gr.Number(8, label="Rank", precision=0, minimum=1, elem_id="tools-rank")
                self.method = gr.Dropdown(DYNAMIC, value=DYNAMIC[0], label="Rank rule", elem_id="tools-method",
                                          info="kohya's dynamic rules choose a rank per module, at most Rank")
                self.value = gr.Number(0.9, label="Rule value", elem_id="tools-value")
            with gr.Row():
                self.resize_btn = gr.Button("Resize", elem_id="tools-resize")
                self.convert_btn = gr.Button("Convert to plain LoRA", elem_id="tools-convert")
            with gr.Row():
                self.merge_rank = gr.Number(0, label="Merge rank (0 = exact)", precision=0, minimum=0,
                                            elem_id="tools-merge-rank")
                self.merge_btn = gr.Button("Merge the mix into one LoRA", elem_id="tools-merge")
                self.bake_btn = gr.Button("Bake the mix into a checkpoint", elem_id="tools-bake")
            self.result = gr.Textbox(label="Result", interactive=False, lines=3, elem_id="tools-result")

    def wire(self, selected, base, slots: list, listing, list_outputs: list) -> None:
        """`listing()` gives the values of `list_outputs` (the Gallery's list, pickers and count)."""
        folders = self.folders

        # Gradio hands a gr.Progress only to a positional parameter whose default is one: hence first, before *args.
        def then_listed(tool):
            def run(progress=gr.Progress(), *args):
                result = tool(folders, *args, progress=progress)
                return (report(result), *listing())
            run.__name__ = tool.__name__  # the name an unexpected error is reported under
            return shown_as_gr_error(run)

        @shown_as_gr_error
        def bake_the_mix(progress=gr.Progress(), *args):
            result = bake_mix(folders, *args, progress=progress)
            return report(result), gr.update(choices=folders.base_models())

        common = dict(concurrency_id="tools", concurrency_limit=1)
        outputs = [self.result, *list_outputs]
        self.resize_btn.click(then_listed(resize_selected), [selected, self.rank, self.method, self.value, self.name,
                                                             self.overwrite], outputs, **common)
        self.convert_btn.click(then_listed(convert_selected), [selected, self.name, self.overwrite], outputs, **common)
        self.merge_btn.click(then_listed(merge_mix), [self.name, self.merge_rank, self.overwrite, *slots], outputs,
                             **common)
        self.bake_btn.click(bake_the_mix, [base, self.name, self.overwrite, *slots], [self.result, base], **common)
