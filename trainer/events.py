"""events.jsonl: the training process's log, one JSON object per line, which the UI follows.

Appending whole lines with one write keeps the file readable while it grows; a reader skips a torn last line.
Event kinds and fields: docs/architecture.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class EventLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled  # only the main process writes when several train together
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields) -> dict:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return record


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
