"""Runs as things to pick: every run folder listed with its model, dataset, progress, state and last loss; one
opened shows its curve, samples, settings and checkpoints, and "Train again" puts its settings in the form.

A run's settings are its config.toml, read back into the form's widgets (settings_form.form_values); keys the
form has no widget for go to the extra-settings box, so starting again reproduces the run exactly.
"""
from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd

from app import settings_form as form
from app.errors import UserError
from app.folders import Folders
from app.jobs import Jobs, RunView
from trainer.config import TrainConfig, load_config
from trainer.models import DEMO_MODEL_DIR

COLUMNS = ["run", "base model", "dataset", "steps", "state", "last loss", "date"]
STATE_WORDS = {"new": "not started", "starting": "starting", "running": "training", "done": "finished",
               "stopped": "stopped", "error": "failed", "crashed": "crashed"}
PATH_KEYS = {("model", "base_model"), ("data", "dataset"), ("output", "name"), ("output", "lora_dir"),
             ("output", "run_dir")}


def _raw(run_dir: Path) -> dict:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def base_label(path: str) -> str:
    if not path or Path(path).resolve() == DEMO_MODEL_DIR.resolve():
        return "Demo model"
    return Path(path).name


def dataset_value(folders: Folders, path: str) -> str:
    """A run's dataset as the picker names it: its name when it is one of ours, else its path."""
    p = Path(path) if path else None
    if p is not None and p.parent.resolve() == folders.datasets_dir.resolve():
        return p.name
    return str(p) if p else ""


def row(folders: Folders, jobs: Jobs, run_dir: Path, queued: list[str]) -> dict[str, Any]:
    raw, view = _raw(run_dir), jobs.view(run_dir)
    state = "queued" if run_dir.name in queued and view.status == "new" else STATE_WORDS.get(view.status, view.status)
    total = view.total or raw.get("training", {}).get("steps", 0)
    events = run_dir / "events.jsonl"
    when = (events if events.exists() else run_dir / "config.toml").stat().st_mtime
    return {"run": run_dir.name, "base model": base_label(raw.get("model", {}).get("base_model", "")),
            "dataset": dataset_value(folders, raw.get("data", {}).get("dataset", "")),
            "steps": f"{view.step}/{total}", "state": state,
            "last loss": round(view.loss[-1][1], 4) if view.loss else None,
            "date": dt.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M")}


def runs_table(folders: Folders, jobs: Jobs, queued: list[str]) -> pd.DataFrame:
    return pd.DataFrame([row(folders, jobs, run, queued) for run in jobs.runs()], columns=COLUMNS)


def run_dir_of(jobs: Jobs, name: str) -> Path:
    run = jobs.runs_dir / (name or "")
    if not name or run.parent != jobs.runs_dir or not (run / "config.toml").exists():
        raise UserError(f"there is no run named '{name}' any more: pick one in the Runs list")
    return run


def run_config(run_dir: Path) -> TrainConfig:
    return load_config(run_dir / "config.toml")


def form_fill(folders: Folders, run_dir: Path) -> tuple[str, str, str, str, list[Any]]:
    """(dataset, base model, LoRA name, extra TOML, widget values) showing a run's settings."""
    cfg = run_config(run_dir)
    return (dataset_value(folders, cfg.data.dataset), cfg.model.base_model or str(DEMO_MODEL_DIR), cfg.output.name,
            extra_toml(cfg), form.form_values(cfg))


def extra_toml(cfg: TrainConfig) -> str:
    """The run's settings that the form has no widget for and that differ from the defaults, as TOML."""
    shown = {tuple(s.key.split(".")) for s in form.SETTINGS}
    ours, defaults = cfg.to_dict(), TrainConfig().to_dict()
    lines = []
    for section, values in ours.items():
        keys = [k for k, v in values.items() if (section, k) not in shown | PATH_KEYS and v != defaults[section][k]]
        if keys:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(values[k])}" for k in keys]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def next_name(jobs: Jobs, folders: Folders, name: str) -> str:
    """A free LoRA name for training again: my-style → my-style-2 (then -3, ...)."""
    stem = re.sub(r"-\d+$", "", name)
    n = 2
    while (jobs.runs_dir / f"{stem}-{n}").exists() or (folders.lora_dir / f"{stem}-{n}.safetensors").exists():
        n += 1
    return f"{stem}-{n}"


def checkpoints_text(view: RunView) -> str:
    """The run's checkpoints and result, as lines for the Runs view."""
    folder = view.run_dir / "checkpoints"
    steps = sorted(int(m.group(1)) for p in folder.glob("step_*") if (m := re.fullmatch(r"step_0*(\d+)", p.name)))
    lines = [f"Checkpoints: {', '.join(f'step {s}' for s in steps)} (in {folder})" if steps
             else "No checkpoints yet."]
    if view.lora_path and Path(view.lora_path).is_file():
        lines.append(f"LoRA: {view.lora_path}")
    return "\n".join(lines)
