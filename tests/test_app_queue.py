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
