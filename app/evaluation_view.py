"""The Train tab's evidence block: base | latest samples side by side per prompt, the checkpoint measures as a
chart, and the recommended checkpoint with its reason and "Keep this one".

Self-contained (its own timer, reading the current run's events.jsonl), so the Train tab only calls build().
"""
from __future__ import annotations

import functools
import html
from pathlib import Path

import gradio as gr
import pandas as pd

from app import checkpoints as ckpts
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders
from app.jobs import Jobs, prompt_legend, sample_caption
from app.train_panel import on_screen_run
from trainer.events import read_events

MEASURES = {"likeness": "likeness (base 0, training images 1)", "strength": "strength (change on its prompts)",
            "leak": "leak (change on prompts without the trigger)", "validation_loss": "validation loss"}


PAIRS_TITLE = "Base | latest for each sample prompt, older samples below"


def side_by_side(events: list[dict]) -> list[tuple[str, str]]:
    """Per sample prompt: the base model's picture (step 0), then the latest; then older samples, newest first."""
    samples = [e for e in events if e.get("event") == "sample"]
    if not samples:
        return []
    base = next((e for e in samples if e.get("step") == 0), None)
    latest = samples[-1]
    items = []
    for i in range(len(latest.get("prompts", []))):
        if base is not None and base is not latest and i < len(base.get("paths", [])):
            items.append((base["paths"][i], sample_caption("base", i)))
        items.append((latest["paths"][i], sample_caption(f"step {latest['step']}", i)))
    for e in reversed(samples[:-1]):
        if e is not base:
            items += [(p, sample_caption(f"step {e['step']}", i)) for i, p in enumerate(e.get("paths", []))]
    return items


def sample_prompts(events: list[dict]) -> list[str]:
    """The latest sample event's prompts: what the captions' prompt numbers refer to."""
    return next((e.get("prompts", []) for e in reversed(events) if e.get("event") == "sample"), [])


def evaluation_frame(events: list[dict]) -> pd.DataFrame | None:
    """Long format for the chart: one row per (checkpoint, measure); the latest evaluation of each step."""
    by_step = {e["step"]: e for e in events if e.get("event") == "evaluation"}
    rows = [{"step": step, "value": float(e[key]), "measure": label}
            for step, e in sorted(by_step.items()) for key, label in MEASURES.items() if e.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", "value", "measure"]) if rows else None


def recommendation_html(events: list[dict]) -> str:
    pick = ckpts.recommendation(Path("."), events)
    if pick is None:
        evaluated = any(e.get("event") == "evaluation" for e in events)
        text = ("Measured checkpoints appear here; a recommendation needs a likeness (training images to compare)."
                if evaluated else "Each checkpoint is measured as it is saved; the recommended one appears here.")
        return f'<div id="recommendation" data-step="">{text}</div>'
    last = max((e["step"] for e in events if e.get("event") == "evaluation"), default=pick["step"])
    note = "" if pick["step"] != last else " (the latest checkpoint)"
    return (f'<div id="recommendation" data-step="{pick["step"]}"><b>Recommended: step {pick["step"]}</b>{note}: '
            f'{html.escape(pick.get("reason", ""))}. The final LoRA stays what you asked for; '
            f'"Keep this one" copies the recommended checkpoint to the LoRA folder.</div>')


def refresh(jobs: Jobs, shown: tuple, name: str | None = None):
    """One poll: the evidence of the run on screen (the one the run panel shows), sent only when it changed."""
    run = on_screen_run(jobs, name)
    path = run / "events.jsonl" if run else None
    stamp = (str(run), path.stat().st_size if path and path.exists() else 0)
    if stamp == tuple(shown or ()):
        return gr.skip(), gr.skip(), gr.skip(), stamp
    events = read_events(run) if run else []
    legend = prompt_legend(sample_prompts(events))
    pairs = gr.update(value=side_by_side(events), label=f"{PAIRS_TITLE}. {legend}" if legend else PAIRS_TITLE)
    return pairs, evaluation_frame(events), recommendation_html(events), stamp


def keep_recommended(jobs: Jobs, folders: Folders, name: str | None = None) -> str:
    run = on_screen_run(jobs, name)
    pick = ckpts.recommendation(run) if run else None
    if pick is None or not pick.get("lora"):
        raise UserError("there is no recommended checkpoint yet: it comes with the first measured checkpoint")
    target = ckpts.keep(Path(pick["lora"]), folders.lora_dir)
    return f"Kept step {pick['step']} as {target.name} in the LoRA folder: it is in the Gallery tab."


def build(folders: Folders, jobs: Jobs, on_screen: gr.State) -> None:
    """The block's components and events (call inside the Train tab's layout); `on_screen`: the run's name."""
    pairs = gr.Gallery(label=PAIRS_TITLE, columns=4, height=300,
                       elem_id="base-latest", object_fit="contain", fit_columns=False)
    chart = gr.LinePlot(None, x="step", y="value", color="measure", title="Checkpoint measures", height=260,
                        elem_id="evaluation-plot")
    with gr.Row():
        pick = gr.HTML(recommendation_html([]), elem_id="recommendation-box")
        keep_btn = gr.Button("Keep this one", scale=0, elem_id="keep-recommended")
    kept = gr.Markdown(elem_id="keep-message")
    shown = gr.State(())
    poll = shown_as_gr_error(functools.partial(refresh, jobs))
    gr.Timer(3.0).tick(poll, [shown, on_screen], [pairs, chart, pick, shown], show_progress="hidden")
    on_screen.change(poll, [shown, on_screen], [pairs, chart, pick, shown], show_progress="hidden")
    keep_btn.click(shown_as_gr_error(functools.partial(keep_recommended, jobs, folders)), on_screen, kept)
