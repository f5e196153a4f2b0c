"""Training jobs: the trainer CLI run as its own process, one at a time, followed through its events.jsonl.

A run is a folder (outputs/runs/<name>) holding config.toml, events.jsonl, train.log and train.pid. The process
is started in its own session so it outlives the browser tab and the UI itself; the pid file lets a restarted UI
find it again. Stop is SIGTERM, which the trainer answers with a checkpoint and a `stopped` event.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from trainer.atomic import write_text
from trainer.config import PROJECT_ROOT
from trainer.events import read_events

from app.errors import UserError

TERMINAL_EVENTS = ("done", "stopped", "error")


class Busy(UserError):
    """Another training is running (the queue waits on this one; other refusals are final)."""


def trainer_command(config_path: Path, resume: bool) -> list[str]:
    """The same command a user would type; the UI adds nothing the CLI does not have."""
    return [sys.executable, "-m", "trainer", "train", "--config", str(config_path)] + (["--resume"] if resume else [])


@dataclass
class RunView:
    """What the Train tab shows about one run, folded from its events."""
    run_dir: Path
    status: str = "new"  # new | starting | running | done | stopped | error | crashed
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    lr: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image path, caption: "step N · #K")
    sample_prompts: list[str] = field(default_factory=list)  # the latest sample event's, numbered from 1
    dataset_lines: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    checkpoint_step: int = 0
    lora_path: str | None = None
    message: str = ""  # the error, or why the process ended without saying so
    ended: str | None = None  # done | stopped | error: how the latest attempt ended (None while it runs)
    stepped: bool = False  # the latest attempt has made a step (until then a resumed run's old ETA is stale)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind in TERMINAL_EVENTS:
            self.ended = kind
        if kind == "start":
            self.ended, self.stepped, self.it_s, self.eta_s = None, False, None, None
            self.total = ev.get("total_steps", self.total)
            if ev.get("resumed_from"):  # steps after the checkpoint are trained again: drop their old losses
                cut = ev.get("resumed_step", self.checkpoint_step)
                self.loss = [(s, l) for s, l in self.loss if s <= cut]
                self.step = cut
            self.message = ""
        elif kind == "dataset":
            self.dataset_lines = list(ev.get("lines", []))
        elif kind == "step":
            self.step, self.total = ev["step"], ev.get("total", self.total)
            self.epoch, self.lr, self.it_s, self.eta_s = ev.get("epoch", 0), ev.get("lr"), ev.get("it_s"), ev.get("eta_s")
            self.stepped = True
            if ev.get("loss") is not None:
                self.loss.append((ev["step"], float(ev["loss"])))
        elif kind == "sample":
            self.sample_prompts = ev.get("prompts") or self.sample_prompts
            for i, path in enumerate(ev.get("paths", [])):
                self.samples.append((str(path), sample_caption(f"step {ev.get('step')}", i)))
        elif kind == "checkpoint":
            self.checkpoint, self.checkpoint_step = ev.get("path"), ev.get("step", self.step)
        elif kind in ("saved", "done"):
            self.lora_path = ev.get("path") or self.lora_path
            self.step = ev.get("step", self.step)
        elif kind == "stopped":
            if ev.get("checkpoint"):
                self.checkpoint, self.checkpoint_step = ev["checkpoint"], ev.get("step", self.step)
            self.step = ev.get("step", self.step)
        elif kind == "error":
            self.message = ev.get("message", "the trainer reported an error without a message")


def sample_caption(when: str, index: int) -> str:
    """A sample picture's caption: the step and the number of its prompt. A whole prompt does not fit under a
    thumbnail (it was cut to "step 200: a …"); prompt_legend lists the prompts by number beside the pictures."""
    return f"{when} · #{index + 1}"


def prompt_legend(prompts: list[str]) -> str:
    """What the captions' numbers stand for: "#1: a red circle; #2: a blue circle"."""
    return "; ".join(f"#{i + 1}: {p}" for i, p in enumerate(prompts))


def _pid_alive(pid: int, config_path: Path) -> bool:
    """True while `pid` is a live process running this run's config (a reused pid is someone else's)."""
    proc = Path("/proc")
    if proc.is_dir():
        try:  # a zombie or a dead process has an empty or missing cmdline
            return str(config_path).encode() in (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:  # macOS/BSD: no /proc; signal 0 only checks that the process exists
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class Jobs:
    """Starts, stops and follows training processes; refuses a second one while one runs."""

    def __init__(self, runs_dir: Path, command=trainer_command):
        self.runs_dir = Path(runs_dir)
        self.command = command
        self._lock = threading.Lock()
        self._view_lock = threading.RLock()
        self._procs: dict[Path, subprocess.Popen] = {}  # started by this UI: poll() also reaps them
        self._views: dict[Path, tuple[int, RunView]] = {}  # run dir -> (events read, view so far)

    # ---- which runs exist and which one is running --------------------------------------------------------

    def is_running(self, run_dir: Path) -> bool:
        run_dir = Path(run_dir)
        proc = self._procs.get(run_dir)
        if proc is not None:
            return proc.poll() is None
        try:
            pid = int((run_dir / "train.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _pid_alive(pid, run_dir / "config.toml")

    def runs(self) -> list[Path]:
        """Run folders, most recently active first."""
        def activity(run: Path) -> float:
            files = [run / "events.jsonl", run / "train.pid", run / "config.toml"]
            return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)
        runs = [p for p in self.runs_dir.iterdir() if (p / "config.toml").exists()] if self.runs_dir.is_dir() else []
        return sorted(runs, key=activity, reverse=True)

    def active(self) -> Path | None:
        return next((run for run in self.runs() if self.is_running(run)), None)

    def current(self) -> Path | None:
        """The run to show: the running one, else the most recent (so a reloaded page shows its job)."""
        return self.active() or next(iter(self.runs()), None)

    # ---- start / stop / resume ------------------------------------------------------------------------------

    def refuse_if_busy(self) -> None:
        running = self.active()
        if running is not None:
            view = self.view(running)
            progress = f"step {view.step}/{view.total}" if view.total else "starting"
            raise Busy(f"Training '{running.name}' is running ({progress}). "
                            "Only one training runs at a time: wait for it to finish, or press Stop first.")

    def refuse_existing(self, run_dir: Path) -> None:
        """A new training must not wipe a run that has checkpoints (an attempt that failed early may go)."""
        if any(ev.get("event") in ("checkpoint", "saved", "done") for ev in read_events(run_dir)):
            raise UserError(f"A run named '{run_dir.name}' already exists with checkpoints. Press Resume to "
                            "continue it, or choose another LoRA name for a new training.")

    def start(self, run_dir: Path, config_text: str) -> None:
        """A fresh run in run_dir with this config (TOML text); refused while another training runs."""
        run_dir = Path(run_dir)
        with self._lock:
            self.refuse_if_busy()
            self.refuse_existing(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fresh(run_dir)
            write_text(run_dir / "config.toml", config_text)
            self._spawn(run_dir, resume=False)

    def start_together(self, run_dirs: list[Path]) -> None:
        """Fresh runs whose config.toml is written (queued) in one trainer process on one loaded base model
        (`train --config a --config b`: trainer/multi_run.py); Stop on any of them stops them all."""
        run_dirs = [Path(d) for d in run_dirs]
        with self._lock:
            self.refuse_if_busy()
            for run_dir in run_dirs:
                self.refuse_existing(run_dir)
            for run_dir in run_dirs:
                self._fresh(run_dir)
            self._spawn(run_dirs[0], resume=False, together=run_dirs[1:])

    def _fresh(self, run_dir: Path) -> None:
        """Forget an earlier attempt that failed before any step: its events and what the page was shown of it."""
        (run_dir / "events.jsonl").unlink(missing_ok=True)
        with self._view_lock:
            self._views.pop(run_dir, None)

    def resume(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        with self._lock:
            self.refuse_if_busy()
            if not (run_dir / "config.toml").exists():
                raise UserError(f"There is no run to resume in {run_dir}: start a training first.")
            view = self.view(run_dir)
            if view.status == "done":
                raise UserError(f"Run '{run_dir.name}' has finished: its LoRA is {view.lora_path} (in the Gallery). "
                                "To train further, start a new run under another LoRA name.")
            if view.checkpoint is None:
                raise UserError(f"Run '{run_dir.name}' has no checkpoint to resume from: press Start instead.")
            self._spawn(run_dir, resume=True)

    def _spawn(self, run_dir: Path, resume: bool, together: list[Path] = ()) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        # Own session/process group: the job survives the UI's Ctrl+C and a UI restart.
        platform = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
                    else {"start_new_session": True})
        with open(run_dir / "train.log", "ab") as log:
            command = self.command(run_dir / "config.toml", resume)
            command += [arg for other in together for arg in ("--config", str(other / "config.toml"))]
            proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, **platform)
        for other in together:  # one process, one log: the others' train.log says where it is
            with open(other / "train.log", "a", encoding="utf-8") as log:
                log.write(f"training together with '{run_dir.name}' in one process: its log is "
                          f"{run_dir / 'train.log'}\n")
        for each in (run_dir, *together):
            self._procs[each] = proc
            # Only the UI writes the pid file (a trainer started from a terminal is not the UI's job): it lets a
            # restarted UI find the process, and a second Start in the next instant already sees this job.
            write_text(each / "train.pid", f"{proc.pid}\n")

    def stop(self, run_dir: Path) -> None:
        """Ask the trainer to save a checkpoint and exit (it writes a `stopped` event)."""
        run_dir = Path(run_dir)
        if not self.is_running(run_dir):
            raise UserError(f"Training '{run_dir.name}' is not running: there is nothing to stop.")
        pid = self._procs[run_dir].pid if run_dir in self._procs else int((run_dir / "train.pid").read_text().split()[0])
        os.kill(pid, signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGTERM)

    # ---- following a run --------------------------------------------------------------------------------------

    def view(self, run_dir: Path) -> RunView:
        """The run's state: new events are read incrementally and folded into the cached view."""
        run_dir = Path(run_dir)
        with self._view_lock:  # timer ticks of several browser tabs arrive on several threads
            seen, view = self._views.get(run_dir, (0, RunView(run_dir)))
            if seen and not (run_dir / "events.jsonl").exists():
                seen, view = 0, RunView(run_dir)
            new = read_events(run_dir, since=seen)
            for ev in new:
                view.apply(ev)
            self._views[run_dir] = (seen + len(new), view)
            view.status = self._status(run_dir, view)
            return dataclasses.replace(view, loss=list(view.loss), samples=list(view.samples))

    def _status(self, run_dir: Path, view: RunView) -> str:
        if self.is_running(run_dir):  # a resumed run is "starting" until its first new step
            return "running" if view.stepped and view.ended is None else "starting"
        if view.ended:
            return view.ended
        if not (run_dir / "train.log").exists():
            return "new"
        proc = self._procs.get(run_dir)
        if proc is not None and sys.platform != "win32" and proc.returncode == -signal.SIGTERM:
            view.message = ("Stopped while it was still starting, before its first checkpoint: "
                            "press Start to begin again.")
            return "stopped"
        code = f" with exit code {proc.returncode}" if proc is not None else ""
        view.message = (f"The training process ended{code} without finishing. Last lines of {run_dir / 'train.log'}:\n"
                        + log_tail(run_dir / "train.log"))
        return "crashed"


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])
