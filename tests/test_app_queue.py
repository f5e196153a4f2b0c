"""The training queue: runs queued while one trains start one after another, in the order shown, each as its
own process; a crash does not stop the queue; the queue is a file a restarted app finds again.

Uses the stand-in trainer of test_app_jobs (the CLI's contract in a few lines), so it runs in seconds.
"""
from __future__ import annotations

import sys

import pytest

from app.errors import UserError
from app.jobs import Jobs
from app.run_queue import RunQueue
from test_app_jobs import FAKE_TRAINER, wait_for
from trainer.events import read_events


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    runs = tmp_path / "runs"
    runs.mkdir()
    jobs = Jobs(runs, command=lambda config, resume: [sys.executable, str(script), "--config", str(config)]
                + (["--resume"] if resume else []))
    queue = RunQueue(jobs)
    yield jobs, queue, runs
    queue.close()
    for run in jobs.runs():
        if jobs.is_running(run):
            jobs.stop(run)


def first_event_time(run) -> float:
    return read_events(run)[0]["t"]


def test_queued_runs_start_in_order_and_a_crash_does_not_stop_the_queue(setup):
    jobs, queue, runs = setup
    jobs.start(runs / "a", "delay=0.05\n")
    assert queue.tick() is None  # a is training: nothing starts
    assert queue.add(runs / "b", "crash\n") == 1
    assert queue.add(runs / "c", "delay=0.01\n") == 2
    assert queue.add(runs / "d", "delay=0.01\n") == 3
    assert (runs / "c" / "config.toml").read_text() == "delay=0.01\n"  # listed and openable at once
    with pytest.raises(UserError, match="already queued"):
        queue.add(runs / "c", "delay=0.01\n")
    queue.move("d", -1)
    queue.remove("c")
    assert queue.names() == ["b", "d"]
    assert RunQueue(Jobs(runs)).names() == ["b", "d"]  # a restarted app finds the queue
    with pytest.raises(UserError, match="not in the queue"):
        queue.remove("c")

    queue.run_in_background(interval_s=0.1)
    wait_for(lambda: jobs.view(runs / "d").status == "done", timeout=60)
    assert jobs.view(runs / "a").status == "done"
    assert jobs.view(runs / "b").status == "crashed"
    assert not (runs / "c" / "train.log").exists(), "a removed run never starts"
    # one at a time, in the queue's order: b started after a ended, d after b
    a_done = read_events(runs / "a")[-1]["t"]
    assert (runs / "b" / "train.log").stat().st_mtime >= a_done
    assert first_event_time(runs / "d") >= (runs / "b" / "train.log").stat().st_mtime
    assert queue.names() == []


def test_a_queued_name_that_cannot_start_is_skipped_with_a_reason(setup):
    jobs, queue, runs = setup
    jobs.start(runs / "a", "delay=0.01\n")
    wait_for(lambda: jobs.view(runs / "a").status == "done")
    jobs.start(runs / "busy", "delay=0.2\n")
    queue.add(runs / "x", "delay=0.01\n")
    # meanwhile "x" gets checkpoints from elsewhere (a CLI run under the same name): it must not be wiped
    (runs / "x" / "events.jsonl").write_text('{"t": 1, "event": "checkpoint", "step": 3, "path": "p"}\n')
    queue.add(runs / "y", "delay=0.01\n")
    jobs.stop(runs / "busy")
    wait_for(lambda: not jobs.is_running(runs / "busy"))
    assert queue.tick() == "x" and "already exists with checkpoints" in queue.last_error
    assert read_events(runs / "x") == [{"t": 1, "event": "checkpoint", "step": 3, "path": "p"}]
    assert queue.tick() == "y"
    wait_for(lambda: jobs.view(runs / "y").status == "done")


def test_queued_runs_sharing_a_base_model_train_together_in_one_process(tmp_path):
    """The real trainer on the demo model: consecutive queued runs with the same base model and precision start as
    one process (trainer/multi_run.py); one with another precision waits for its own."""
    from trainer.config import PROJECT_ROOT, build_config

    runs = tmp_path / "runs"
    jobs = Jobs(runs)  # the real trainer command
    queue = RunQueue(jobs)

    def config(name: str, precision: str = "no") -> str:
        return build_config({
            "preset": "demo", "data": {"dataset": str(PROJECT_ROOT / "datasets" / "demo-style")},
            "training": {"steps": 2, "batch_size": 1, "mixed_precision": precision},
            "sample": {"every_n_steps": 0, "steps": 1}, "evaluation": {"at_checkpoints": "off"},
            "output": {"name": name, "lora_dir": str(tmp_path / "Lora"), "run_dir": str(runs / name)}}).to_toml()
    for name, precision in (("a", "no"), ("b", "no"), ("c", "bf16")):
        queue.add(runs / name, config(name, precision))
    try:
        assert queue.tick() == "a"
        assert queue.names() == ["c"]  # another precision: not in a and b's process
        assert (runs / "a" / "train.pid").read_text() == (runs / "b" / "train.pid").read_text()
        wait_for(lambda: all(jobs.view(runs / n).status == "done" for n in "ab"), timeout=240)
        assert (tmp_path / "Lora" / "a.safetensors").exists() and (tmp_path / "Lora" / "b.safetensors").exists()
        assert not (runs / "c" / "events.jsonl").exists()
    finally:
        for run in jobs.runs():
            if jobs.is_running(run):
                jobs.stop(run)
