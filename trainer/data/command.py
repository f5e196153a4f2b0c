"""The dataset report as an API call (UI) and as a command (`python -m trainer dataset DIR`)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import ConfigError, DataConfig, TrainConfig, build_config
from .dataset import load_dataset
from .report import DatasetError, DatasetReport


def dataset_report(path_or_cfg: str | Path | DataConfig | TrainConfig, seed: int = 0) -> DatasetReport:
    """Check a dataset and describe it. Never raises for bad data: an unusable dataset is a report with
    usable=False and the reason."""
    batch, accum = 1, 1
    if isinstance(path_or_cfg, TrainConfig):
        tr = path_or_cfg.training
        cfg, seed, batch, accum = path_or_cfg.data, tr.seed, tr.batch_size, tr.grad_accum
    elif isinstance(path_or_cfg, DataConfig):
        cfg = path_or_cfg
    else:
        cfg = DataConfig(dataset=str(path_or_cfg))
    try:
        ds = load_dataset(cfg, seed)
        ds.report.batch_size, ds.report.grad_accum = batch, accum
        ds.report.batches_per_epoch = ds.batches_per_epoch(batch)
        return ds.report
    except DatasetError as e:
        if not e.report.source:
            e.report.source = cfg.dataset
        e.report.batch_size, e.report.grad_accum = batch, accum
        return e.report


def run_dataset_command(path: str | Path, **options) -> int:
    """Print the report of the dataset at `path`; `options` are data.* settings (resolution=768, …).
    Exit code 0 when the dataset is usable, 1 when it is not, 2 for a bad option."""
    try:
        cfg = build_config({"data": {**options, "dataset": str(path)}})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = dataset_report(cfg.data, cfg.training.seed)
    print("\n".join(report.lines()))
    return 0 if report.usable else 1
