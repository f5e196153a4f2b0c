"""The training queue: runs waiting for the one training process, started one after another.

Start while a training runs writes the new run's folder (config.toml) at once, so it is listed and its settings
can be opened, and adds its name to runs/queue.json. A thread of the app checks every few seconds: when nothing
is training, the first queued run starts as its own process, together with the queued runs right after it that
share its base model and precision (one process, one loaded copy of the base: trainer/multi_run.py). The queue is
a file, so it survives closing the browser and restarting the app; a run that fails or crashes simply ends, and
the next one starts.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from trainer.atomic import write_text

from app.errors import UserError
from app.jobs import Busy, Jobs

log = logging.getLogger("app.queue")


class RunQueue:
    def __init__(self, jobs: Jobs):
        self.jobs = jobs
        self.path = jobs.runs_dir / "queue.json"
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error = ""  # why the latest queued run could not start (shown under the queue)

    # ---- the list, kept in a file ------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            try:
                names = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return []
            return [n for n in names if isinstance(n, str)]

    def _write(self, names: list[str]) -> None:
        write_text(self.path, json.dumps(names))

    def add(self, run_dir: Path, config_text: str) -> int:
        """Queue a run (its config written now); returns its place in the queue, 1 = next."""
        run_dir = Path(run_dir)
        with self._lock:
            names = self.names()
            if run_dir.name in names:
                raise UserError(f"a run named '{run_dir.name}' is already queued: choose another LoRA name")
            self.jobs.refuse_existing(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(run_dir / "config.toml", config_text)
            self._write(names + [run_dir.name])
            return len(names) + 1

    def remove(self, name: str) -> None:
        with self._lock:
            names = self.names()
            if name not in names:
                raise UserError(f"'{name}' is not in the queue (it may have started already): nothing to remove")
            names.remove(name)
            self._write(names)

    def move(self, name: str, by: int) -> None:
        """Move a queued run earlier (by < 0) or later (by > 0)."""
        with self._lock:
            names = self.names()
            if name not in names:
                raise UserError(f"'{name}' is not in the queue (it may have started already): pick a queued run")
            i = names.index(name)
            j = min(max(i + by, 0), len(names) - 1)
            names.insert(j, names.pop(i))
            self._write(names)

    # ---- starting the next one --------------------------------------------------------------------------

    def tick(self) -> str | None:
        """Start the first queued run when nothing trains; returns its name (None: nothing started)."""
        with self._lock:
            names = self.names()
            if not names or self.jobs.active() is not None:
                return None
            name, group = names[0], self._together(names)
            run_dir = self.jobs.runs_dir / name
            try:
                if len(group) > 1:
                    self.jobs.start_together([self.jobs.runs_dir / n for n in group])
                else:
                    self.jobs.start(run_dir, (run_dir / "config.toml").read_text(encoding="utf-8"))
            except Busy:
                return None  # someone pressed Start in the same instant: wait for that one
            except (UserError, OSError) as e:  # this run cannot start at all: the others still can
                self.last_error = f"Queued run '{name}' was skipped: {e}"
                log.warning(self.last_error)
                group = [name]
            self._write(names[len(group):])
            return name

    def _together(self, names: list[str]) -> list[str]:
        """The first queued run and the consecutive ones after it that can train with it in one process on one
        loaded base model: the same base model, family and precision (trainer/multi_run.py's check)."""
        from trainer.config import load_config
        from trainer.errors import StudioError
        from trainer.multi_run import check_together

        group, cfgs = names[:1], []
        for name in names:
            run_dir = self.jobs.runs_dir / name
            try:
                cfg = load_config(run_dir / "config.toml")
                check_together(cfgs + [cfg])
                if cfgs:
                    self.jobs.refuse_existing(run_dir)  # it would be refused: it goes alone, with the reason
            except (StudioError, UserError, OSError, ValueError):
                break
            cfgs.append(cfg)
            group = names[:len(cfgs)]
        return group

    def run_in_background(self, interval_s: float = 2.0) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the queue must outlive one bad tick; the log has the trace
                    log.exception("the training queue could not start its next run")
        self._thread = threading.Thread(target=loop, name="training-queue", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
