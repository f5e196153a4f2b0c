"""The Train tab: the dataset (picked or made, uploaded, captioned), the settings, and the run on screen.

Handlers first, then the layout (build_train_tab), then the event wiring. Training itself is the trainer CLI run
by app.jobs (one at a time; app.run_queue holds the rest); this file only writes the dataset and the run config.
"The run on screen" is per browser tab (a gr.State holding its name): the status, curve and samples beside the
form are that run's, and the form shows its settings whenever another run is opened.
"""
from __future__ import annotations

import functools

import gradio as gr

from app import datasets, evaluation_view, runs
from app import settings_form as form
from app.caption_grid import PAGE_SIZE, build_caption_grid, page_label, turn_page
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders, safe_folder_name
from app.jobs import Jobs
from app.run_queue import RunQueue
from app.train_panel import build_train_panel, refresh, status_html  # noqa: F401 - status_html: tests use it here
from app.uploads import add_trigger_word, find_replace
from trainer.config import ConfigError, TrainConfig, build_config
from trainer.data import dataset_report as engine_dataset_report


# ---- engine calls (the only places this tab touches trainer/) ----------------------------------------------

def dataset_report(cfg: TrainConfig) -> tuple[bool, str]:
    """(usable, report text): every image decoded and checked, as training will see it."""
    report = engine_dataset_report(cfg)
    return report.usable, "\n".join(report.lines())


def run_config(folders: Folders, dataset: str, base_model: str, preset: str | None, name: str, extra: str,
               values: list) -> TrainConfig:
    """Preset, then the form, then the extra TOML; the paths last so nothing can point them elsewhere."""
    name = safe_folder_name(name, "LoRA name")
    if not dataset:
        raise UserError("no dataset is chosen: pick one in the Dataset list, or press New dataset… and upload images")
    dataset_dir = datasets.dataset_dir(folders, dataset)
    if not datasets.images_of(folders, dataset):
        raise UserError(f"the dataset '{dataset}' has no images yet: upload some images (or a zip) first")
    paths = {"model": {"base_model": base_model or ""},
             "data": {"dataset": str(dataset_dir)},
             "output": {"name": name, "lora_dir": str(folders.lora_dir), "run_dir": str(folders.runs_dir / name)}}
    try:
        return build_config({"preset": preset} if preset else {}, form.form_layer(values), form.extra_layer(extra),
                            paths)
    except ConfigError as e:
        raise ConfigError(form.labelled(str(e))) from e


# ---- dataset ----------------------------------------------------------------------------------------------

def picker(folders: Folders, value: str | None):
    """The dataset list (with counts) showing `value`; a folder opened by path is listed by its path."""
    choices = datasets.counted_choices(folders)
    if value and not datasets.is_managed(folders, value):
        choices.append((f"{value} (opened by path)", value))
    return gr.update(choices=choices, value=value)


def make_dataset(folders: Folders, name: str, v: int):
    created = datasets.new_dataset(folders, name)
    return picker(folders, created), f"Made the dataset '{created}': now upload its images.", "", v + 1


def open_by_path(folders: Folders, path: str, v: int):
    value = datasets.open_folder(path)
    count = len(datasets.images_of(folders, value))
    return picker(folders, value), f"Opened {value}: {count} images (read-only here).", v + 1


def remove_dataset(folders: Folders, value: str, v: int):
    message = datasets.delete_dataset(folders, value)
    names = folders.list_datasets()
    return picker(folders, names[0] if names else None), message, v + 1


def upload(folders: Folders, files: list[str] | None, value: str, v: int):
    """An upload into an empty dataset is saved; into one with images it waits for Add or Replace."""
    if not value:
        raise UserError("name the dataset first: press New dataset…, type a name, then upload the images")
    if not files:
        raise UserError("no files were uploaded: choose images (or a .zip of images and captions) first")
    have = len(datasets.images_of(folders, value))
    if have and datasets.is_managed(folders, value):
        ask = f"'{value}' already holds {have} images: add the new files to them, or replace them?"
        return gr.update(visible=True), ask, files, gr.skip(), gr.skip(), gr.skip()
    message = datasets.upload_into(folders, files, value, "add")
    return gr.update(visible=False), "", None, message, picker(folders, value), v + 1


def finish_upload(folders: Folders, mode: str, pending: list[str] | None, value: str, v: int):
    if not pending:
        raise UserError("there is no upload waiting: choose the files again")
    message = datasets.upload_into(folders, pending, value, mode)
    return gr.update(visible=False), None, message, picker(folders, value), v + 1


def bulk_trigger(folders: Folders, value: str, word: str, v: int):
    datasets.refuse_outside(folders, value, "change the captions of")
    changed = add_trigger_word(datasets.dataset_dir(folders, value), word)
    return f"Added '{word.strip()}' to {changed} caption(s).", v + 1


def bulk_replace(folders: Folders, value: str, find: str, replace: str, v: int):
    datasets.refuse_outside(folders, value, "change the captions of")
    changed = find_replace(datasets.dataset_dir(folders, value), find, replace)
    return f"Replaced in {changed} caption(s).", v + 1


# ---- the run on screen ------------------------------------------------------------------------------------

def start(folders: Folders, jobs: Jobs, queue: RunQueue, dataset, base_model, preset, name, extra, *values):
    cfg = run_config(folders, dataset, base_model, preset, name, extra, list(values))
    existing = cfg.output_path()
    if existing.exists():
        raise UserError(f"a LoRA named '{cfg.output.name}' already exists ({existing}): choose another LoRA name")
    usable, report = dataset_report(cfg)
    if not usable:
        raise UserError(f"the dataset has no usable images, so training was not started:\n{report}")
    running = jobs.active()
    if running is not None:
        place = queue.add(cfg.run_path(), cfg.to_toml())
        return report, (f"Queued '{cfg.output.name}' ({'next' if place == 1 else f'number {place}'} in the queue): "
                        f"it starts when '{running.name}' ends."), cfg.output.name
    jobs.start(cfg.run_path(), cfg.to_toml())
    return report, f"Started training '{cfg.output.name}'.", cfg.output.name


def stop(jobs: Jobs):
    run = jobs.active()
    if run is None:
        raise UserError("no training is running: there is nothing to stop")
    training = jobs.view(run).status == "running"  # before its first step there is nothing to save
    jobs.stop(run)
    return (f"Stopping '{run.name}': a checkpoint is being saved." if training
            else f"Stopping '{run.name}' before its first step: no checkpoint is made.")


def resume(jobs: Jobs, name: str | None):
    run = jobs.runs_dir / name if name else jobs.current()
    if run is None:
        raise UserError("there is no training to resume yet: press Start")
    jobs.resume(run)
    return f"Resumed '{run.name}' from its last checkpoint."


def show_run(folders: Folders, jobs: Jobs, name: str):
    """Open a run: it becomes the run on screen, and the form shows its settings."""
    run = runs.run_dir_of(jobs, name)
    dataset, base, lora_name, extra, values = runs.form_fill(folders, run)
    return (name, {}, picker(folders, dataset), gr.update(choices=folders.base_models(), value=base), None,
            lora_name, extra, *values)


def train_again(folders: Folders, jobs: Jobs, name: str):
    if not name:
        raise UserError("open a run first: click it in the Runs list")
    fresh = runs.next_name(jobs, folders, name)
    return fresh, f"The form holds the settings of '{name}' under the new name '{fresh}': press Start to train it."


def queue_action(queue: RunQueue, what: str, name: str):
    if not name:
        raise UserError("open a queued run first: click it in the Runs list")
    if what == "remove":
        queue.remove(name)
        return f"Removed '{name}' from the queue (its settings stay in the Runs list)."
    queue.move(name, -1 if what == "up" else 1)
    return f"Moved '{name}' {what}: the queue is now {', '.join(queue.names())}."


def page_load(folders: Folders, jobs: Jobs, queue: RunQueue):
    """A (re)opened page shows the running or latest run with its settings, or the dataset changed last."""
    run = jobs.current()
    if run is None:
        return ("", {}, picker(folders, folders.latest_dataset()), gr.update(choices=folders.base_models()),
                *[gr.skip()] * (3 + len(form.SETTINGS)))
    return show_run(folders, jobs, run.name)


# ---- layout and wiring ------------------------------------------------------------------------------------

def _dataset_section(demo: gr.Blocks, folders: Folders) -> dict:
    """Step 1's components: picker, new/open/delete, upload with add-or-replace, bulk edits, the caption grid."""
    c: dict = {}
    gr.Markdown("### 1. Dataset")
    first = not folders.list_datasets()
    with gr.Row(equal_height=True):
        c["dataset"] = gr.Dropdown(datasets.counted_choices(folders), value=folders.latest_dataset(), scale=3,
                                   label="Dataset", elem_id="dataset-name", info="a folder in outputs/datasets")
        c["new_btn"] = gr.Button("New dataset…", size="sm", scale=1, elem_id="new-dataset")
        c["delete_btn"] = gr.Button("Delete dataset", size="sm", scale=1, variant="stop", elem_id="delete-dataset")
    with gr.Row(visible=first, equal_height=True) as c["new_row"]:
        c["new_name"] = gr.Textbox(label="New dataset's name", placeholder="e.g. my-style", scale=3,
                                   elem_id="new-dataset-name")
        c["create_btn"] = gr.Button("Create", variant="primary", scale=1, elem_id="create-dataset")
    with gr.Accordion("Open a folder elsewhere by its path (read-only; kohya N_name folders too)", open=False):
        with gr.Row(equal_height=True):
            c["path"] = gr.Textbox(show_label=False, placeholder="/home/me/datasets/my-set", scale=3,
                                   elem_id="open-path")
            c["open_btn"] = gr.Button("Open", scale=1, elem_id="open-folder")
    c["files"] = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt", ".caption"],
                         label="Upload images and captions (the pictures and their .txt files, or a .zip of them)",
                         elem_id="upload", height=120)
    with gr.Row(visible=False, equal_height=True, elem_id="upload-choice") as c["choice_row"]:
        c["ask"] = gr.Markdown(elem_id="upload-question")
        c["add_btn"] = gr.Button("Add to them", size="sm", elem_id="upload-add")
        c["replace_btn"] = gr.Button("Replace them", size="sm", variant="stop", elem_id="upload-replace")
    c["upload_msg"] = gr.Textbox(label="Dataset messages", lines=2, interactive=False, elem_id="upload-message")
    c["version"], c["page"], c["pending"] = gr.State(0), gr.State(0), gr.State(None)
    with gr.Accordion("Captions", open=True, elem_id="captions"):
        with gr.Row(equal_height=True):
            c["trigger"] = gr.Textbox(label="Trigger word", placeholder="e.g. sks style", scale=3)
            c["trigger_btn"] = gr.Button("Add to every caption", scale=1, elem_id="add-trigger")
        with gr.Row(equal_height=True):
            c["find"] = gr.Textbox(label="Find", scale=2)
            c["replace_with"] = gr.Textbox(label="Replace with", scale=2)
            c["replace_btn2"] = gr.Button("Replace in all captions", scale=1, elem_id="replace")
        with gr.Row(equal_height=True):
            c["prev"] = gr.Button("◀ Previous", size="sm", scale=0, elem_id="page-prev")
            c["page_text"] = gr.Markdown(elem_id="page-label")
            c["next"] = gr.Button("Next ▶", size="sm", scale=0, elem_id="page-next")
        build_caption_grid(demo, folders, c["dataset"], c["version"], c["page"], c["upload_msg"])
    c["check_btn"] = gr.Button("Check dataset", elem_id="check-dataset")
    c["report"] = gr.Textbox(label="Dataset report", lines=6, interactive=False, elem_id="dataset-report")
    return c


def _settings_section(folders: Folders) -> dict:
    c: dict = {}
    gr.Markdown("### 2. Settings")
    bases = folders.base_models()
    c["base_model"] = gr.Dropdown(bases, value=bases[0][1], label="Base model", elem_id="train-base-model",
                                  info="the demo model, or a checkpoint in the models folder")
    c["preset"] = gr.Dropdown(form.preset_names(), value=form.default_preset(), label="Preset", elem_id="preset",
                              info="fills the settings below; empty when they show an opened run's")
    c["name"] = gr.Textbox("my-lora", label="LoRA name", info="the file name in the LoRA folder", elem_id="lora-name")
    # The widgets are built showing the default preset, so a page without runs needs no page-load fill.
    initial = dict(zip((s.key for s in form.SETTINGS), form.preset_values(form.default_preset())))
    made: dict[str, gr.components.Component] = {}
    key_settings = [s for s in form.SETTINGS if not s.advanced]
    for pair in range(0, len(key_settings), 2):
        with gr.Row():
            for setting in key_settings[pair:pair + 2]:
                made[setting.key] = setting.make(setting.label, initial[setting.key], setting.elem_id)
    with gr.Accordion("Advanced", open=False):
        for setting in form.SETTINGS:
            if setting.advanced:
                made[setting.key] = setting.make(setting.label, initial[setting.key], setting.elem_id)
        c["extra"] = gr.Code("", language=None, label="Extra settings (TOML, any key of the run config)", lines=3)
    c["widgets"] = [made[s.key] for s in form.SETTINGS]
    return c


def build_train_tab(demo: gr.Blocks, folders: Folders, jobs: Jobs, queue: RunQueue) -> None:
    """The Train tab's components and events (call inside `with demo:` and a gr.Tab)."""
    on_screen, shown, timer = gr.State(""), gr.State({}), gr.Timer(2.0)
    with gr.Row():
        with gr.Column(scale=3):
            d = _dataset_section(demo, folders)
            s = _settings_section(folders)
            # Inside the form's column, so the run panel beside it stays in view while this is read.
            with gr.Accordion("Checkpoints: base | latest, measures, the recommended one", open=True):
                evaluation_view.build(folders, jobs, on_screen)
        with gr.Column(scale=2, elem_id="train-panel"):
            p = build_train_panel()
    _wire_dataset(folders, d, s)
    _wire_runs(folders, jobs, queue, d, s, p, on_screen, shown, timer)
    demo.load(shown_as_gr_error(functools.partial(page_load, folders, jobs, queue)), None,
              _run_form(d, s, on_screen, shown), show_progress="hidden").then(
        _poll(folders, jobs, queue), [shown, on_screen], [*p.poll_outputs(), shown], show_progress="hidden")


def _settings_inputs(d: dict, s: dict) -> list:
    return [d["dataset"], s["base_model"], s["preset"], s["name"], s["extra"], *s["widgets"]]


def _run_form(d: dict, s: dict, on_screen, shown) -> list:
    """What opening a run sets: the run on screen, a fresh poll, and the form (show_run's outputs)."""
    return [on_screen, shown, *_settings_inputs(d, s)]


def _poll(folders: Folders, jobs: Jobs, queue: RunQueue):
    return shown_as_gr_error(functools.partial(refresh, folders, jobs, queue))


def _wire_dataset(folders: Folders, d: dict, s: dict) -> None:
    h = lambda fn: shown_as_gr_error(functools.partial(fn, folders))  # noqa: E731
    dataset, version, msg = d["dataset"], d["version"], d["upload_msg"]

    def label(value, page):
        return page_label(len(datasets.images_of(folders, value)), page or 0)
    dataset.change(lambda: (0, ""), None, [d["page"], d["report"]], show_progress="hidden")
    for event in (dataset.change, version.change, d["page"].change):
        event(label, [dataset, d["page"]], d["page_text"], show_progress="hidden")
    d["new_btn"].click(lambda: gr.update(visible=True), None, d["new_row"], show_progress="hidden")
    d["create_btn"].click(h(make_dataset), [d["new_name"], version], [dataset, msg, d["new_name"], version]).success(
        lambda: gr.update(visible=False), None, d["new_row"], show_progress="hidden")
    d["open_btn"].click(h(open_by_path), [d["path"], version], [dataset, msg, version])
    confirm = "(value, v) => [value && confirm(`Move the dataset ${value} to the trash?`) ? value : '', v]"
    d["delete_btn"].click(lambda value, v: h(remove_dataset)(value, v) if value else (gr.skip(),) * 3,
                          [dataset, version], [dataset, msg, version], js=confirm)

    @shown_as_gr_error
    def check(value, base, preset, _name, extra, *values):
        # the LoRA name plays no part in the report: a placeholder, so that a bad name is not reported here
        return dataset_report(run_config(folders, value, base, preset, "dataset-check", extra, list(values)))[1]
    settings = _settings_inputs(d, s)
    d["check_btn"].click(check, settings, d["report"])
    # After an upload the report comes at once: it says which files cannot be used and why.
    d["files"].upload(h(upload), [d["files"], dataset, version],
                      [d["choice_row"], d["ask"], d["pending"], msg, dataset, version]).success(
        lambda pending: gr.skip() if pending else None, d["pending"], d["files"]).success(check, settings, d["report"])
    for button, mode in ((d["add_btn"], "add"), (d["replace_btn"], "replace")):
        button.click(shown_as_gr_error(functools.partial(finish_upload, folders, mode)), [d["pending"], dataset, version],
                     [d["choice_row"], d["pending"], msg, dataset, version]).success(
            lambda: None, None, d["files"]).success(check, settings, d["report"])
    d["trigger_btn"].click(h(bulk_trigger), [dataset, d["trigger"], version], [msg, version])
    d["replace_btn2"].click(h(bulk_replace), [dataset, d["find"], d["replace_with"], version], [msg, version])
    for button, by in ((d["prev"], -1), (d["next"], 1)):
        button.click(functools.partial(turn_page, folders, by=by), [dataset, d["page"]], [d["page"], d["page_text"]],
                     show_progress="hidden")
    s["preset"].input(shown_as_gr_error(form.preset_values), s["preset"], s["widgets"])  # a user's choice only


def _wire_runs(folders: Folders, jobs: Jobs, queue: RunQueue, d: dict, s: dict, p, on_screen, shown, timer) -> None:
    poll, poll_outputs = _poll(folders, jobs, queue), [*p.poll_outputs(), shown]
    started_report = gr.State("")  # to the report box only after a successful Start: a refusal stays a toast
    # Each button first clears the line under the buttons: it speaks of the latest action only.
    # trigger_mode "multiple": a second Start while the first is still being handled queues a second run (the
    # default, "once", silently drops that click).
    p.start.click(lambda: "", None, p.action_msg, show_progress="hidden", trigger_mode="multiple").then(
        shown_as_gr_error(functools.partial(start, folders, jobs, queue)), _settings_inputs(d, s),
        [started_report, p.action_msg, on_screen], concurrency_limit=1).success(
        lambda text: (text, {}), started_report, [d["report"], shown], show_progress="hidden").then(
        poll, [shown, on_screen], poll_outputs, show_progress="hidden")
    p.stop.click(lambda: "", None, p.action_msg, show_progress="hidden").then(
        shown_as_gr_error(functools.partial(stop, jobs)), None, p.action_msg)
    p.resume.click(lambda: "", None, p.action_msg, show_progress="hidden").then(
        shown_as_gr_error(functools.partial(resume, jobs)), on_screen, p.action_msg, concurrency_limit=1)

    def picked(table, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return show_run(folders, jobs, str(table.iloc[row]["run"]))
    p.runs_table.select(shown_as_gr_error(picked), p.runs_table, _run_form(d, s, on_screen, shown)).then(
        poll, [shown, on_screen], poll_outputs, show_progress="hidden")
    p.run_picker.input(shown_as_gr_error(functools.partial(show_run, folders, jobs)), p.run_picker,
                       _run_form(d, s, on_screen, shown)).then(
        poll, [shown, on_screen], poll_outputs, show_progress="hidden")
    p.train_again.click(shown_as_gr_error(functools.partial(train_again, folders, jobs)), on_screen,
                        [s["name"], p.action_msg])
    for button, what in ((p.move_up, "up"), (p.move_down, "down"), (p.unqueue, "remove")):
        button.click(shown_as_gr_error(functools.partial(queue_action, queue, what)), on_screen, p.action_msg).then(
            poll, [shown, on_screen], poll_outputs, show_progress="hidden")
    timer.tick(poll, [shown, on_screen], poll_outputs, show_progress="hidden")
