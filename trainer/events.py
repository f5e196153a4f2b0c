"""events.jsonl: the training process's log, one JSON object per line, which the UI follows.

Appending whole lines with one write keeps the file readable while it grows; a reader skips a torn last line.
Event kinds and fields: docs/architecture.md.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class EventLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled  # only the main process writes when several train together
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields) -> dict:
        record = _finite({"t": round(time.time(), 3), "event": event, **fields})
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str, allow_nan=False) + "\n")
        return record


def _finite(value):
    """NaN and ±inf become null: JSON has no such numbers, and the UI's parser refuses Python's bare `NaN`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Pace:
    """Speed and time left for the step events. A process's first step is left out of both (its allocations and
    first kernel calls made the UI promise a run 3× too long); pauses for samples and checkpoints are left out of
    the speed (it/s is the steps' own) but kept in the ETA, since they come again."""

    def __init__(self, smoothing: float = 0.8):
        self.smoothing = smoothing
        self.start: float | None = None  # end of this process's first step
        self.steps = 0  # steps since then
        self.last: float | None = None  # end of the last step or pause
        self.it_s: float | None = None

    def step(self, remaining: int, now: float | None = None) -> tuple[float | None, float | None]:
        """(it/s, ETA in seconds) after a step; (None, None) after the first."""
        now = time.time() if now is None else now
        if self.start is None:
            self.start = self.last = now
            return None, None
        rate = 1.0 / max(now - self.last, 1e-9)
        self.it_s = rate if self.it_s is None else self.smoothing * self.it_s + (1 - self.smoothing) * rate
        self.steps, self.last = self.steps + 1, now
        return round(self.it_s, 4), round(remaining * (now - self.start) / self.steps, 1)

    def paused(self, now: float | None = None) -> None:
        """After a sample or checkpoint: the next step's time starts here."""
        if self.last is not None:
            self.last = time.time() if now is None else now


def read_events(run_dir: str | Path, since: int = 0) -> list[dict]:
    """Events from line `since` on; a partly written last line is left for the next read."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < since or not line.endswith("\n"):
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
