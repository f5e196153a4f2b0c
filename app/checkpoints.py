"""A run's checkpoint LoRAs (`<run>/loras/<name>-step<NNNNNN>.safetensors`) with what each measured, the
recommended one, and "Keep this one": a checkpoint copied into the LoRA folder.

Read from the run folder alone (the files and events.jsonl's `evaluation` / `recommendation` events), so the
Gallery and the Train tab show the same thing, for runs of this UI or of the command line.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from app.errors import UserError, shown_as_gr_error
from trainer.events import read_events

STEP = re.compile(r"-step(\d+)$")
COLUMNS = ["step", "likeness", "strength", "leak", "validation loss", "recommended"]


@dataclass
class Checkpoint:
    step: int
    path: Path
    evaluation: dict | None  # the latest `evaluation` event of this step
    recommended: bool = False


def recommendation(run_dir: Path, events: list[dict] | None = None) -> dict | None:
    """The latest `recommendation` event (step, lora, reason), or None."""
    events = read_events(run_dir) if events is None else events
    return next((e for e in reversed(events) if e.get("event") == "recommendation"), None)


def run_checkpoints(run_dir: Path, events: list[dict] | None = None) -> list[Checkpoint]:
    """The run's checkpoint LoRA files, oldest first, each with its evaluation when it was measured."""
    events = read_events(run_dir) if events is None else events
    evaluations = {e["step"]: e for e in events if e.get("event") == "evaluation"}
    pick = recommendation(run_dir, events)
    out = []
    for path in (run_dir / "loras").glob("*.safetensors"):
        match = STEP.search(path.stem)
        if match:
            step = int(match.group(1))
            out.append(Checkpoint(step, path, evaluations.get(step), bool(pick and pick.get("step") == step)))
    return sorted(out, key=lambda c: c.step)


def checkpoint_table(checkpoints: list[Checkpoint]) -> pd.DataFrame:
    rows = []
    for c in checkpoints:
        ev = c.evaluation or {}
        rows.append({"step": c.step, "likeness": ev.get("likeness"), "strength": ev.get("strength"),
                     "leak": ev.get("leak"), "validation loss": ev.get("validation_loss"),
                     "recommended": "★ recommended" if c.recommended else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def checkpoint_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of every run's checkpoints for the Gallery's pickers: "my-style · step 600 ★"."""
    out = []
    for run_dir in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()) if Path(runs_dir).is_dir() else []:
        for c in run_checkpoints(run_dir):
            out.append((f"{run_dir.name} · step {c.step}{' ★' if c.recommended else ''}", str(c.path)))
    return out


def runs_with_checkpoints(runs_dir: Path) -> list[str]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and any((p / "loras").glob("*-step*.safetensors")))


def keep(checkpoint: Path, lora_dir: Path) -> Path:
    """Copy a checkpoint LoRA into the LoRA folder under its own name (the run's name and its step), beside a
    preview: the run's final LoRA stays as it is. Written under a temporary name and renamed."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file() or not STEP.search(checkpoint.stem):
        raise UserError(f"{checkpoint} is not a checkpoint LoRA of a run any more: pick one in the list")
    target = Path(lora_dir) / checkpoint.name
    if target.exists():
        raise UserError(f"{target.name} is already in the LoRA folder ({target.parent})")
    target.parent.mkdir(parents=True, exist_ok=True)
    preview = _sample_of(checkpoint)
    if preview is not None:  # first, so that a listed LoRA never lacks the preview it will have
        _copy(preview, target.with_name(f"{target.stem}.preview.png"))
    _copy(checkpoint, target)
    return target


def _copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _sample_of(checkpoint: Path) -> Path | None:
    """The run's first sample picture at the checkpoint's step, else the evaluation's, if one was drawn."""
    step = int(STEP.search(checkpoint.stem).group(1))
    run = checkpoint.parent.parent
    found = sorted((run / "samples").glob(f"step_{step:06d}_*.png")) or sorted(
        (run / "evaluation").glob(f"step_{step:06d}_*.png"))
    return found[0] if found else None


# ---- the Gallery's block: a run's checkpoints, grouped under it ----------------------------------------------

def show_run(runs_dir: Path, name: str):
    """(table, recommendation line, paths in table order) of one run."""
    if not name:
        return checkpoint_table([]), "", []
    run_dir = Path(runs_dir) / name
    events = read_events(run_dir)
    found = run_checkpoints(run_dir, events)
    pick = recommendation(run_dir, events)
    line = f"**Recommended: step {pick['step']}** — {pick.get('reason', '')}" if pick else "No recommendation yet."
    return checkpoint_table(found), line, [str(c.path) for c in found]


def pick_row(paths: list[str], evt: gr.SelectData):
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if row is None or row >= len(paths):
        raise UserError("that checkpoint is no longer listed: pick the run again")
    path = paths[row]
    note = f"Selected {Path(path).stem}: Add to mix or sweep it, or Keep this one."
    return path, gr.update(value=path), note


def keep_selected(lora_dir: Path, path: str) -> str:
    if not path or not STEP.search(Path(path).stem):
        raise UserError("select a checkpoint in the run's table first")
    return f"Kept as {keep(Path(path), lora_dir).name}: press Refresh to see it in the LoRA list."


def build_gallery_block(runs_dir: Path, lora_dir: Path, selected: gr.State, sweep_lora: gr.Dropdown) -> gr.Dropdown:
    """Inside the Gallery's layout: pick a run, see its checkpoints with their measures; a selected checkpoint
    becomes the Gallery's selection (Add to mix, sweep). Returns the run picker (to refresh its choices)."""
    with gr.Accordion("Checkpoints of a run", open=False, elem_id="run-checkpoints"):
        run = gr.Dropdown(runs_with_checkpoints(runs_dir), value=None, label="Run", elem_id="checkpoint-run")
        line = gr.Markdown(elem_id="checkpoint-recommendation")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="checkpoint-table")
        with gr.Row():
            keep_btn = gr.Button("Keep this one", elem_id="keep-checkpoint", scale=0)
            note = gr.Markdown(elem_id="checkpoint-note")
    paths = gr.State([])
    run.change(shown_as_gr_error(lambda name: show_run(runs_dir, name)), run, [table, line, paths])
    table.select(shown_as_gr_error(pick_row), paths, [selected, sweep_lora, note])
    keep_btn.click(shown_as_gr_error(lambda path: keep_selected(lora_dir, path)), selected, note)
    return run
