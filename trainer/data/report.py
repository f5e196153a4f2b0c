"""The dataset report: what was found, what will be trained and how, and what was done with every odd file.

The UI shows lines(), the CLI prints them, the training process writes them into its `dataset` event, and
to_dict() is the same content for machines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StudioError

LINE_LIMIT = 300  # a 10,000-word caption made a 60,000-character "Top tags" line


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class FolderSummary:
    name: str  # the folder's name (the ss_tag_frequency / ss_dataset_dirs key)
    path: Path
    repeats: int  # as configured (regularisation images may be repeated more to balance, see warnings)
    class_tokens: str
    is_reg: bool
    images: int = 0  # usable images
    draws: int = 0  # images × repeats actually drawn per epoch


@dataclass
class DatasetReport:
    source: str  # the data.dataset the report is about
    usable: bool = False
    reason: str = ""  # why nothing can be trained, when not usable
    folders: list[FolderSummary] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it is not used)
    warnings: list[str] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)  # trained on the class text (or trigger word)
    long_captions: list[tuple[Path, int, int]] = field(default_factory=list)  # (file, tokens, cut off); in warnings too
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # (w, h) -> images
    # An epoch in three counts: draws (every image × its repeats), batches of `batch_size` draws (one bucket per
    # batch, so not simply draws / batch size), optimiser steps (one per `grad_accum` batches, what events count).
    draws_per_epoch: int = 0
    batch_size: int = 1  # a run's batch size and gradient accumulation, when the report is about a run
    grad_accum: int = 1  # (dataset_report(TrainConfig))
    batches_per_epoch: int = 0
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    root: Path | None = None  # file names in lines() are shown relative to this

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch, as the training loop counts them."""
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    def display_name(self, path: Path) -> str:
        """A file's name relative to the dataset root (short, and still unambiguous)."""
        if self.root is not None:
            try:
                return str(Path(path).relative_to(self.root))
            except ValueError:
                pass
        return str(path)

    def lines(self) -> list[str]:
        out = [f"Dataset: {self.source}"]
        for f in self.folders:
            kind = f" (regularisation images, class {f.class_tokens!r})" if f.is_reg else (
                f" (class text {f.class_tokens!r})" if f.class_tokens else "")
            out.append(f"  {f.name}: {f.images} image{'s' * (f.images != 1)} × {f.repeats} repeat"
                       f"{'s' * (f.repeats != 1)}{kind}")
        if self.grad_accum > 1:
            out.append(f"Images per epoch: {self.draws_per_epoch}; batches of {self.batch_size} per epoch: "
                       f"{self.batches_per_epoch}; steps per epoch with gradient accumulation {self.grad_accum}: "
                       f"{self.steps_per_epoch}")
        elif self.batch_size > 1:
            out.append(f"Images per epoch: {self.draws_per_epoch}; steps per epoch at batch size {self.batch_size}: "
                       f"{self.batches_per_epoch}")
        else:
            out.append(f"Steps per epoch at batch size 1: {self.draws_per_epoch}")
        if self.buckets:
            out.append("Buckets (w×h: images): " + ", ".join(
                f"{w}×{h}: {n}" for (w, h), n in sorted(self.buckets.items(), key=lambda kv: (-kv[1], kv[0]))))
        if self.skipped:
            out.append(f"Skipped {len(self.skipped)} file{'s' * (len(self.skipped) != 1)}:")
            out += [f"  {self.display_name(path)}: {reason}" for path, reason in self.skipped]
        if self.missing_captions:
            out.append(f"No caption ({len(self.missing_captions)}; trained on the class text / trigger word): "
                       + ", ".join(self.display_name(p) for p in self.missing_captions))
        if self.warnings:
            out.append("Warnings:")
            out += [f"  {w}" for w in self.warnings]
        if self.top_tags:
            out.append("Top tags: " + ", ".join(f"{cap(tag, 40)} ({n})" for tag, n in self.top_tags))
        out.append("Usable: yes" if self.usable else f"NOT USABLE: {self.reason}")
        return [cap(line, LINE_LIMIT) for line in out]

    def to_dict(self) -> dict:
        return {
            "source": self.source, "usable": self.usable, "reason": self.reason,
            "folders": [{"name": f.name, "path": str(f.path), "repeats": f.repeats, "class_tokens": f.class_tokens,
                         "is_reg": f.is_reg, "images": f.images, "draws": f.draws} for f in self.folders],
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "warnings": list(self.warnings),
            "missing_captions": [str(p) for p in self.missing_captions],
            "long_captions": [{"path": str(p), "tokens": n, "lost": lost} for p, n, lost in self.long_captions],
            "buckets": [{"resolution": [w, h], "images": n} for (w, h), n in sorted(self.buckets.items())],
            "draws_per_epoch": self.draws_per_epoch, "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch, "grad_accum": self.grad_accum,
            "steps_per_epoch": self.steps_per_epoch,
            "top_tags": [[tag, n] for tag, n in self.top_tags],
        }


class DatasetError(StudioError):
    """Nothing in the dataset can be trained on (or its settings cannot work); the message says why and
    .report holds everything that was found on the way."""

    def __init__(self, message: str, report: DatasetReport | None = None):
        super().__init__(message)
        self.report = report if report is not None else DatasetReport(source="", usable=False, reason=message)
