"""The Train tab: dataset upload and captions, the dataset report, settings, and the running job.

Functions first, then the layout (build_train_tab), then the event wiring at its end. Training itself is the
trainer CLI run by app.jobs; this file only writes the dataset and the run config and shows what happens.
"""
from __future__ import annotations

import functools
import html
from pathlib import Path

import gradio as gr
import pandas as pd

from app import settings_form as form
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders, safe_folder_name
from app.jobs import Jobs, RunView
from app.uploads import add_trigger_word, find_replace, list_images, read_caption, save_uploads, write_caption
from trainer.config import ConfigError, TrainConfig, build_config
from trainer.data import dataset_report as engine_dataset_report

MAX_EDITOR_IMAGES = 200  # the caption editor renders one textbox per image


# ---- engine calls (the only places this tab touches trainer/) ----------------------------------------------

def dataset_report(cfg: TrainConfig) -> tuple[bool, str]:
    """(usable, report text): every image decoded and checked, as training will see it."""
    report = engine_dataset_report(cfg)
    return report.usable, "\n".join(report.lines())


def run_config(folders: Folders, dataset: str, base_model: str, preset: str, name: str, extra: str,
               values: list) -> TrainConfig:
    """Preset, then the form, then the extra TOML; the paths last so nothing can point them elsewhere."""
    name = safe_folder_name(name, "LoRA name")
    dataset_dir = _dataset_dir(folders, dataset)
    paths = {"model": {"base_model": base_model or ""},
             "data": {"dataset": str(dataset_dir)},
             "output": {"name": name, "lora_dir": str(folders.lora_dir), "run_dir": str(folders.runs_dir / name)}}
    try:
        return build_config({"preset": preset} if preset else {}, form.form_layer(values), form.extra_layer(extra),
                            paths)
    except ConfigError as e:
        raise ConfigError(form.labelled(str(e))) from e


# ---- dataset ----------------------------------------------------------------------------------------------

def _dataset_dir(folders: Folders, dataset: str) -> Path:
    path = folders.dataset_path(dataset)
    if not list_images(path):
        raise UserError(f"the dataset '{dataset}' has no images yet: upload some images (or a zip) first")
    return path


def upload(folders: Folders, files: list[str] | None, dataset: str, version: int):
    if not files:
        raise UserError("no files were uploaded: choose images (or a .zip of images and captions) first")
    result = save_uploads(files, folders.dataset_path(dataset))
    if not result.saved:
        raise UserError(f"none of the uploaded files is an image or a caption. {result.message()}")
    return result.message(), gr.update(choices=folders.list_datasets(), value=dataset), None, version + 1


def bulk_trigger(folders: Folders, dataset: str, word: str, version: int):
    changed = add_trigger_word(_dataset_dir(folders, dataset), word)
    return f"Added '{word.strip()}' to {changed} caption(s).", version + 1


def bulk_replace(folders: Folders, dataset: str, find: str, replace: str, version: int):
    changed = find_replace(_dataset_dir(folders, dataset), find, replace)
    return f"Replaced in {changed} caption(s).", version + 1


# ---- the running job --------------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


STATUS_TEXT = {"new": "not started", "starting": "starting (loading the model and the dataset)",
               "running": "running", "done": "finished", "stopped": "stopped",
               "error": "failed", "crashed": "ended unexpectedly"}


def status_html(view: RunView | None) -> str:
    if view is None:
        return '<div id="train-status-text" data-status="idle">No training yet: upload images, then press Start.</div>'
    text = STATUS_TEXT.get(view.status, view.status)
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
        parts.append(f"ETA {_duration(view.eta_s)}")
    if view.lora_path and view.status == "done":
        parts.append(f"saved {html.escape(Path(view.lora_path).name)}: it is in the Gallery tab")
    bar = f'<progress value="{view.step}" max="{max(view.total, 1)}" style="width:100%"></progress>'
    message = f"<pre style='white-space:pre-wrap'>{html.escape(view.message)}</pre>" if view.message else ""
    return (f'<div id="train-status-text" data-status="{view.status}" data-step="{view.step}">'
            f'{" · ".join(parts)}{bar}{message}</div>')


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


def refresh(jobs: Jobs, shown: dict):
    """One poll (timer tick or page load): only what changed is sent to the browser."""
    run = jobs.current()
    view = jobs.view(run) if run else None
    key = lambda what: (str(run), what)  # noqa: E731
    outputs = [status_html(view)]
    n_loss, n_samples = (len(view.loss), len(view.samples)) if view else (0, 0)
    if shown.get("loss") != key(n_loss):  # never an empty frame: the plot then draws no lines at all later
        outputs.append(loss_frame(view.loss) if n_loss else None)
    else:
        outputs.append(gr.skip())
    outputs.append(gr.skip() if shown.get("samples") == key(n_samples)
                   else list(reversed(view.samples)) if view else [])
    done_path = view.lora_path if view and view.status == "done" and Path(view.lora_path or "").is_file() else None
    if shown.get("download") != key(done_path):
        outputs.append(gr.update(value=done_path, visible=done_path is not None,
                                 label=f"Download {Path(done_path).name}" if done_path else "Download"))
    else:
        outputs.append(gr.skip())
    shown = {"loss": key(n_loss), "samples": key(n_samples), "download": key(done_path)}
    return *outputs, shown


def start(folders: Folders, jobs: Jobs, dataset, base_model, preset, name, extra, *values):
    jobs.refuse_if_busy()  # at once, before the dataset check; jobs.start checks again under its lock
    cfg = run_config(folders, dataset, base_model, preset, name, extra, list(values))
    existing = cfg.output_path()
    if existing.exists():
        raise UserError(f"a LoRA named '{cfg.output.name}' already exists ({existing}): choose another LoRA name")
    usable, report = dataset_report(cfg)
    if not usable:
        raise UserError(f"the dataset has no usable images, so training was not started:\n{report}")
    jobs.start(cfg.run_path(), cfg.to_toml())
    return report, f"Started training '{cfg.output.name}'."


def stop(jobs: Jobs):
    run = jobs.active()
    if run is None:
        raise UserError("no training is running: there is nothing to stop")
    training = jobs.view(run).status == "running"  # before its first step there is nothing to save
    jobs.stop(run)
    return (f"Stopping '{run.name}': a checkpoint is being saved." if training
            else f"Stopping '{run.name}' before its first step: no checkpoint is made.")


def resume(jobs: Jobs):
    run = jobs.current()
    if run is None:
        raise UserError("there is no training to resume yet: press Start")
    jobs.resume(run)
    return f"Resumed '{run.name}' from its last checkpoint."


# ---- layout and wiring ------------------------------------------------------------------------------------

def build_train_tab(demo: gr.Blocks, folders: Folders, jobs: Jobs) -> None:
    """The Train tab's components and events (call inside `with demo:` and a gr.Tab)."""
    datasets, latest = folders.list_datasets(), folders.latest_dataset()
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### 1. Images and captions")
            with gr.Row():
                dataset = gr.Dropdown(datasets, value=latest or "my-dataset", allow_custom_value=True,
                                      label="Dataset folder", info="pick one, or type a new name", elem_id="dataset-name")
            files = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt", ".caption"],
                            label="Upload images (several files, or a .zip with images and .txt captions)",
                            elem_id="upload")
            upload_msg = gr.Textbox(label="Upload", lines=2, interactive=False, elem_id="upload-message")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", placeholder="e.g. sks style", scale=3)
                trigger_btn = gr.Button("Add to every caption", scale=1, elem_id="add-trigger")
            with gr.Row():
                find = gr.Textbox(label="Find", scale=2)
                replace_with = gr.Textbox(label="Replace with", scale=2)
                replace_btn = gr.Button("Replace in all captions", scale=1, elem_id="replace")
            bulk_msg = gr.Markdown()
            version = gr.State(0)  # bumped by bulk edits: re-renders the caption editor

            @gr.render(inputs=[dataset, version], triggers=[dataset.change, version.change, demo.load])
            def caption_editor(name, _version):
                try:
                    images = list_images(folders.dataset_path(name))
                except UserError:
                    images = []
                if not images:
                    gr.Markdown("*No images in this dataset yet.*")
                    return
                shown = images[:MAX_EDITOR_IMAGES]
                if len(images) > len(shown):
                    gr.Markdown(f"Showing the first {len(shown)} of {len(images)} images.")
                for row_start in range(0, len(shown), 4):
                    with gr.Row(equal_height=True):
                        for image in shown[row_start:row_start + 4]:
                            with gr.Column(min_width=150, elem_classes="caption-card"):
                                gr.Image(str(image), show_label=False, height=130, interactive=False,
                                         buttons=[], container=False)
                                box = gr.Textbox(read_caption(image), label=image.name, lines=2, interactive=True,
                                                 elem_classes="caption-box")

                                @shown_as_gr_error
                                def save_caption(text, image=image):
                                    write_caption(image, text)
                                box.blur(save_caption, inputs=box, outputs=None, show_progress="hidden")

            check_btn = gr.Button("Check dataset", elem_id="check-dataset")
            report = gr.Textbox(label="Dataset report", lines=6, interactive=False, elem_id="dataset-report")

        with gr.Column(scale=2):
            gr.Markdown("### 2. Settings")
            bases = folders.base_models()
            base_model = gr.Dropdown(bases, value=bases[0][1], label="Base model", elem_id="train-base-model",
                                     info="the demo model, or a checkpoint in the models folder")
            preset = gr.Dropdown(form.preset_names(), value=form.default_preset(), label="Preset", elem_id="preset")
            name = gr.Textbox("my-lora", label="LoRA name", info="the file name in the LoRA folder", elem_id="lora-name")
            # The widgets are built showing the default preset, not filled in by a page-load event: such an event
            # overwrote whatever the user had typed before it arrived.
            initial = dict(zip((s.key for s in form.SETTINGS), form.preset_values(form.default_preset())))
            made: dict[str, gr.components.Component] = {}
            key_settings = [s for s in form.SETTINGS if not s.advanced]
            for pair in range(0, len(key_settings), 2):
                with gr.Row():
                    for setting in key_settings[pair:pair + 2]:
                        made[setting.key] = setting.make(setting.label, initial[setting.key])
            with gr.Accordion("Advanced", open=False):
                for setting in form.SETTINGS:
                    if setting.advanced:
                        made[setting.key] = setting.make(setting.label, initial[setting.key])
                extra = gr.Code("", language=None, label="Extra settings (TOML, any key of the run config)", lines=3)
            widgets = [made[s.key] for s in form.SETTINGS]

            gr.Markdown("### 3. Train")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                resume_btn = gr.Button("Resume", elem_id="resume")
            action_msg = gr.Markdown(elem_id="train-action")
            status = gr.HTML(status_html(None), elem_id="train-status")
            download = gr.DownloadButton("Download", visible=False, elem_id="download-trained")
    loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss",
                            height=260, elem_id="loss-plot")
    samples = gr.Gallery(label="Samples (newest first)", columns=4, height=320, elem_id="samples",
                         object_fit="contain", fit_columns=False)
    shown = gr.State({})
    timer = gr.Timer(2.0)

    # ---- wiring ----
    trigger_btn.click(shown_as_gr_error(functools.partial(bulk_trigger, folders)),
                      [dataset, trigger, version], [bulk_msg, version])
    replace_btn.click(shown_as_gr_error(functools.partial(bulk_replace, folders)),
                      [dataset, find, replace_with, version], [bulk_msg, version])
    preset.change(shown_as_gr_error(form.preset_values), preset, widgets)

    @shown_as_gr_error
    def folders_now():  # a reloaded page sees datasets and checkpoints added since the app started
        return (gr.update(choices=folders.list_datasets(), value=folders.latest_dataset() or "my-dataset"),
                gr.update(choices=folders.base_models()))
    demo.load(folders_now, None, [dataset, base_model], show_progress="hidden")

    settings = [dataset, base_model, preset, name, extra, *widgets]

    @shown_as_gr_error
    def check_dataset(dataset_name, base, preset_name, _lora_name, extra_text, *values):
        # the LoRA name plays no part in the report: a placeholder, so that a bad name is not reported here
        cfg = run_config(folders, dataset_name, base, preset_name, "dataset-check", extra_text, list(values))
        return dataset_report(cfg)[1]

    check_btn.click(check_dataset, settings, report)
    dataset.change(lambda: "", None, report, show_progress="hidden")  # the report was about the other dataset
    # After an upload the report comes at once: it says which files cannot be used and why.
    files.upload(shown_as_gr_error(functools.partial(upload, folders)), [files, dataset, version],
                 [upload_msg, dataset, files, version]).success(check_dataset, settings, report)
    started_report = gr.State("")  # to the report box only after a successful Start: a refusal stays a toast
    # Each button first clears the line under the buttons: it speaks of the latest action only.
    start_btn.click(lambda: "", None, action_msg, show_progress="hidden").then(
        shown_as_gr_error(functools.partial(start, folders, jobs)), settings, [started_report, action_msg],
        concurrency_limit=1).success(lambda text: text, started_report, report, show_progress="hidden")
    stop_btn.click(lambda: "", None, action_msg, show_progress="hidden").then(
        shown_as_gr_error(functools.partial(stop, jobs)), None, action_msg)
    resume_btn.click(lambda: "", None, action_msg, show_progress="hidden").then(
        shown_as_gr_error(functools.partial(resume, jobs)), None, action_msg, concurrency_limit=1)
    poll = shown_as_gr_error(functools.partial(refresh, jobs))
    poll_outputs = [status, loss_plot, samples, download, shown]
    timer.tick(poll, shown, poll_outputs, show_progress="hidden")
    demo.load(poll, shown, poll_outputs, show_progress="hidden")  # a reloaded page shows the running job at once
