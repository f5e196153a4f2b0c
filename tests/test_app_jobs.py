"""Training jobs: one at a time, stop/resume by signal, found again by a restarted UI, events followed.

The trainer here is a stand-in script speaking the CLI's contract (docs/architecture.md: events.jsonl through
trainer.events.EventLog, train.pid, SIGTERM → checkpoint + `stopped`, --resume), so the job logic is tested in
seconds; the real CLI is driven end to end by the browser test.
"""
from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from app.errors import UserError
from app.jobs import Jobs
from app.train_tab import status_html, stop
from trainer.events import EventLog, read_events

FAKE_TRAINER = textwrap.dedent('''
    import json, signal, sys, time
    from pathlib import Path
    from trainer.events import EventLog

    config = Path(sys.argv[sys.argv.index("--config") + 1])
    run_dir = config.parent
    text = config.read_text()
    total, delay = 30, float(text.split("delay=")[1].split()[0]) if "delay=" in text else 0.05
    if "slowstart" in text:
        time.sleep(30)  # still importing: no SIGTERM handler yet, as a real trainer loading torch
    if "crash" in text:
        print("Traceback: something broke in the trainer", file=sys.stderr)
        sys.exit(3)
    (run_dir / "train.pid").write_text(f"{__import__('os').getpid()}\\n")
    log = EventLog(run_dir)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    first = 0
    if "--resume" in sys.argv:
        first = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    log.emit("start", run=run_dir.name, total_steps=total, steps_per_epoch=10, family="sd1", base_model="x",
             resumed_from=str(run_dir / "checkpoints" / f"step_{first:06d}") if first else None,
             resumed_step=first if first else None)
    log.emit("dataset", lines=["3 images usable"], images=3, skipped=0)
    for step in range(first + 1, total + 1):
        time.sleep(delay)
        log.emit("step", step=step, total=total, epoch=step // 10, loss=1.0 / step, lr=1e-4, it_s=20.0,
                 eta_s=(total - step) * delay)
        if step % 10 == 0:
            log.emit("sample", step=step, paths=[str(run_dir / f"samples/step_{step}_0.png")], prompts=["a cat"])
        if stop:
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": step}))
            log.emit("checkpoint", step=step, path=str(run_dir / "checkpoints" / f"step_{step:06d}"))
            log.emit("stopped", step=step, checkpoint=str(run_dir / "checkpoints" / f"step_{step:06d}"))
            sys.exit(0)
    log.emit("saved", path=str(run_dir / "out.safetensors"), step=total)
    log.emit("done", path=str(run_dir / "out.safetensors"), step=total, seconds=1.0)
''')


@pytest.fixture
def jobs(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    runs = tmp_path / "runs"
    runs.mkdir()
    started: list[Jobs] = []

    def make() -> Jobs:
        j = Jobs(runs, command=lambda config, resume: [sys.executable, str(script), "--config", str(config)]
                 + (["--resume"] if resume else []))
        started.append(j)
        return j
    yield make
    for j in started:  # never leave a stand-in trainer running
        for run in j.runs():
            if j.is_running(run):
                j.stop(run)


def wait_for(predicate, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_second_start_is_refused_and_does_not_disturb_the_first(jobs, tmp_path):
    j = jobs()
    first = tmp_path / "runs" / "first"
    j.start(first, "delay=0.05\n")
    wait_for(lambda: j.view(first).step >= 2)
    assert j.active() == first and j.view(first).status == "running"
    with pytest.raises(UserError, match=r"Training 'first' is running \(step \d+/30\).*one training"):
        j.start(tmp_path / "runs" / "second", "delay=0.05\n")
    with pytest.raises(UserError, match="Training 'first' is running"):
        jobs().start(tmp_path / "runs" / "second", "delay=0.05\n")  # a second UI instance refuses too
    assert not (tmp_path / "runs" / "second").exists()
    view = wait_for(lambda: (v := j.view(first)).status == "done" and v)
    # followed incrementally, every step is seen exactly once, in order
    assert [s for s, _ in view.loss] == list(range(1, 31))
    assert view.loss == [(ev["step"], ev["loss"]) for ev in read_events(first) if ev["event"] == "step"]
    assert [c for _, c in view.samples] == ["step 10 · #1", "step 20 · #1", "step 30 · #1"]
    assert view.sample_prompts == ["a cat"]
    assert 'Sample prompts: #1: a cat</div>' in status_html(view)  # what the captions' numbers stand for
    assert view.lora_path.endswith("out.safetensors") and view.dataset_lines == ["3 images usable"]
    assert j.current() == first and j.active() is None


def test_stop_then_resume_continues_from_the_checkpoint(jobs, tmp_path):
    j = jobs()
    run = tmp_path / "runs" / "style"
    j.start(run, "delay=0.1\n")
    wait_for(lambda: j.view(run).step >= 3)
    assert stop(j) == "Stopping 'style': a checkpoint is being saved."  # the Stop button's message
    view = wait_for(lambda: (v := j.view(run)).status == "stopped" and v)
    stopped_at = view.step
    assert view.checkpoint.endswith(f"step_{stopped_at:06d}") and stopped_at < 30
    assert f"stopped (checkpoint at step {stopped_at}: Resume continues it)" in status_html(view)
    with pytest.raises(UserError, match="Press Resume"):
        j.start(run, "delay=0.01\n")  # a new Start must not wipe a run that has checkpoints
    j.resume(run)
    view = wait_for(lambda: (v := j.view(run)).status == "done" and v, timeout=30)
    steps = [s for s, _ in view.loss]
    assert steps == list(range(1, 31)), "resumed losses continue the curve without repeats"
    assert steps.count(stopped_at) == 1
    with pytest.raises(UserError, match="'style' has finished: its LoRA is .*out.safetensors"):
        j.resume(run)  # not "no checkpoint: press Start", which a finished run's name refuses


def test_a_restarted_ui_finds_the_running_job_and_can_stop_it(jobs, tmp_path):
    run = tmp_path / "runs" / "long"
    jobs().start(run, "delay=0.2\n")
    fresh = jobs()  # no Popen handle: only the pid file and /proc
    wait_for(lambda: fresh.view(run).step >= 1)
    assert fresh.active() == run and fresh.current() == run
    with pytest.raises(UserError, match="'long' is running"):
        fresh.start(tmp_path / "runs" / "other", "delay=0.01\n")
    fresh.stop(run)
    assert wait_for(lambda: fresh.view(run).status == "stopped")


def test_a_crash_without_an_error_event_is_reported_with_the_log(jobs, tmp_path):
    j = jobs()
    run = tmp_path / "runs" / "broken"
    j.start(run, "crash\n")
    view = wait_for(lambda: (v := j.view(run)).status == "crashed" and v)
    assert "exit code 3" in view.message and "something broke in the trainer" in view.message
    j.start(run, "delay=0.01\n")  # a failed attempt without checkpoints may simply be started again
    assert wait_for(lambda: j.view(run).status == "done")


def test_stop_and_resume_refuse_clearly_when_there_is_nothing_to_do(jobs, tmp_path):
    j = jobs()
    run = tmp_path / "runs" / "idle"
    with pytest.raises(UserError, match="not running"):
        j.stop(run)
    with pytest.raises(UserError, match="no run to resume"):
        j.resume(run)


def test_a_torn_last_line_is_read_once_it_is_complete(jobs, tmp_path):
    j = jobs()
    run = tmp_path / "runs" / "manual"
    log = EventLog(run)
    (run / "config.toml").write_text("")
    log.emit("start", run="manual", total_steps=4, steps_per_epoch=4, family="sd1", base_model="x", resumed_from=None)
    log.emit("step", step=1, total=4, epoch=0, loss=0.5, lr=1e-4, it_s=1.0, eta_s=3.0)
    line = json.dumps({"t": 0, "event": "step", "step": 2, "total": 4, "epoch": 0, "loss": 0.25})
    with open(run / "events.jsonl", "a") as f:
        f.write(line[:20])  # the trainer is in the middle of writing this line
    assert j.view(run).loss == [(1, 0.5)]
    with open(run / "events.jsonl", "a") as f:
        f.write(line[20:] + "\n")
    assert j.view(run).loss == [(1, 0.5), (2, 0.25)]


def test_stop_while_starting_is_a_stop_not_a_crash(jobs, tmp_path):
    j = jobs()
    run = tmp_path / "runs" / "early"
    j.start(run, "slowstart\n")
    assert j.view(run).status == "starting"
    assert "before its first step: no checkpoint" in stop(j)
    view = wait_for(lambda: (v := j.view(run)).status != "starting" and v)
    assert view.status == "stopped" and "press Start" in view.message
    assert "Resume" not in status_html(view)  # no checkpoint was saved: the status must not promise one
    with pytest.raises(UserError, match="no checkpoint"):
        j.resume(run)
