"""What the Train tab shows of the run on screen: status with step and time left, the loss curve, the newest
samples, the download, and the Runs list with the queue. It sits beside the dataset and settings and stays in
view while the page scrolls (see app.main's CSS), so training can be watched without scrolling away.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from app import runs
from app.folders import Folders
from app.jobs import Jobs, RunView, prompt_legend
from app.run_queue import RunQueue

STATUS_TEXT = {"new": "not started", "starting": "starting (loading the model and the dataset)",
               "running": "running", "done": "finished", "stopped": "stopped",
               "error": "failed", "crashed": "ended unexpectedly"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def status_html(view: RunView | None, queued_at: int = 0, ready: bool = False) -> str:
    """The status line; data-* attributes carry the state for tests (data-ready: the page's first poll came)."""
    flag = ' data-ready="1"' if ready else ""
    if view is None:
        return (f'<div id="train-status-text" data-status="idle"{flag}>No training yet: choose a dataset, '
                f'upload images, then press Start.</div>')
    text = STATUS_TEXT.get(view.status, view.status)
    if view.status == "new" and queued_at:
        text = f"queued ({'next' if queued_at == 1 else f'number {queued_at}'} in the queue)"
    if view.status == "stopped" and view.checkpoint:
        text += f" (checkpoint at step {view.checkpoint_step}: Resume continues it)"
    parts = [f"<b>{html.escape(view.name)}</b>: {text}"]
    if view.total:
        parts.append(f"step {view.step} / {view.total} ({100 * view.step // max(view.total, 1)}%)")
    if view.status == "running":
        if view.loss:
            parts.append(f"loss {view.loss[-1][1]:.4f}")
        if view.it_s:
            parts.append(f"{view.it_s:.2f} it/s")
        parts.append(f"time left {_duration(view.eta_s)}")
    if view.lora_path and view.status == "done":
        parts.append(f"saved {html.escape(Path(view.lora_path).name)}: it is in the Gallery tab")
    bar = f'<progress value="{view.step}" max="{max(view.total, 1)}" style="width:100%"></progress>'
    message = f"<pre style='white-space:pre-wrap'>{html.escape(view.message)}</pre>" if view.message else ""
    # the samples' captions say "step 200 · #1": what #1 is
    legend = (f'<div id="sample-legend">Sample prompts: {html.escape(prompt_legend(view.sample_prompts))}</div>'
              if view.sample_prompts else "")
    return (f'<div id="train-status-text" data-status="{view.status}" data-step="{view.step}" '
            f'data-run="{html.escape(view.name)}"{flag}>{" · ".join(parts)}{bar}{message}{legend}</div>')


def loss_frame(points: list[tuple[int, float]], smoothing: float = 0.9) -> pd.DataFrame:
    """Per-step loss and its running average (the trend is what matters; single steps are noisy)."""
    smooth, avg = [], None
    for _, loss in points:
        avg = loss if avg is None else smoothing * avg + (1 - smoothing) * loss
        smooth.append(avg)
    steps = [s for s, _ in points]
    return pd.DataFrame({"step": pd.Series(steps * 2, dtype="int64"),
                         "loss": pd.Series([l for _, l in points] + smooth, dtype="float64"),
                         "series": ["loss"] * len(points) + ["average"] * len(points)})


def on_screen_run(jobs: Jobs, name: str | None) -> Path | None:
    """The run the page shows: the one opened (or started) there, else the running or latest one."""
    if name and (jobs.runs_dir / name / "config.toml").exists():
        return jobs.runs_dir / name
    return jobs.current()


def refresh(folders: Folders, jobs: Jobs, queue: RunQueue, shown: dict, name: str | None):
    """One poll (timer tick or page load): only what changed is sent to the browser."""
    run = on_screen_run(jobs, name)
    view = jobs.view(run) if run else None
    queued = queue.names()
    key = lambda what: (str(run), what)  # noqa: E731
    at = queued.index(run.name) + 1 if run and run.name in queued else 0
    outputs = [status_html(view, at, ready=True)]
    n_loss, n_samples = (len(view.loss), len(view.samples)) if view else (0, 0)
    if shown.get("loss") != key(n_loss):  # never an empty frame: the plot then draws no lines at all later
        outputs.append(loss_frame(view.loss) if n_loss else None)
    else:
        outputs.append(gr.skip())
    outputs.append(gr.skip() if shown.get("samples") == key(n_samples)
                   else list(reversed(view.samples)) if view else [])
    done_path = view.lora_path if view and view.status == "done" and Path(view.lora_path or "").is_file() else None
    outputs.append(gr.skip() if shown.get("download") == key(done_path) else
                   gr.update(value=done_path, visible=done_path is not None,
                             label=f"Download {Path(done_path).name}" if done_path else "Download"))
    table = runs.runs_table(folders, jobs, queued)
    rows = table.to_dict("split")["data"]
    outputs.append(gr.skip() if shown.get("table") == rows else table)
    names = [r[0] for r in rows]
    outputs.append(gr.skip() if shown.get("names") == names and shown.get("on") == str(run) else
                   gr.update(choices=names, value=run.name if run else None))
    info = runs.checkpoints_text(view) if view else ""
    if queue.last_error:
        info += f"\n{queue.last_error}"
    outputs.append(gr.skip() if shown.get("info") == key(info) else info)
    shown = {"loss": key(n_loss), "samples": key(n_samples), "download": key(done_path), "table": rows,
             "info": key(info), "names": names, "on": str(run)}
    return *outputs, shown


@dataclass
class TrainPanel:
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    action_msg: gr.Textbox
    status: gr.HTML
    download: gr.DownloadButton
    loss_plot: gr.LinePlot
    samples: gr.Gallery
    runs_table: gr.Dataframe
    run_picker: gr.Dropdown
    run_info: gr.Textbox
    train_again: gr.Button
    move_up: gr.Button
    move_down: gr.Button
    unqueue: gr.Button

    def poll_outputs(self) -> list:
        return [self.status, self.loss_plot, self.samples, self.download, self.runs_table, self.run_picker,
                self.run_info]


def build_train_panel() -> TrainPanel:
    """The right-hand column's components (call inside a gr.Column)."""
    gr.Markdown("### 3. Train")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
        resume = gr.Button("Resume", elem_id="resume")
    action_msg = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="train-action",
                            placeholder="Start trains the form's settings; while a run trains, Start queues it.")
    status = gr.HTML(status_html(None), elem_id="train-status")
    download = gr.DownloadButton("Download", visible=False, elem_id="download-trained")
    loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss", height=200,
                            elem_id="loss-plot")
    samples = gr.Gallery(label="Samples (newest first)", columns=4, height=190, elem_id="samples",
                         object_fit="contain", fit_columns=False)
    with gr.Accordion("Runs and queue", open=True, elem_id="runs-section"):
        run_picker = gr.Dropdown([], label="Run on screen", elem_id="run-picker",
                                 info="pick a run (or click it in the list) to see it and put its settings in the form")
        runs_table = gr.Dataframe(headers=runs.COLUMNS, interactive=False, elem_id="runs-table", max_height=260,
                                  label="Every run")
        run_info = gr.Textbox(show_label=False, interactive=False, container=False, lines=2, elem_id="run-info")
        with gr.Row():
            train_again = gr.Button("Train again", size="sm", elem_id="train-again")
            move_up = gr.Button("Move up", size="sm", elem_id="queue-up")
            move_down = gr.Button("Move down", size="sm", elem_id="queue-down")
            unqueue = gr.Button("Remove from queue", size="sm", elem_id="queue-remove")
    return TrainPanel(start, stop, resume, action_msg, status, download, loss_plot, samples, runs_table, run_picker,
                      run_info,
                      train_again, move_up, move_down, unqueue)
