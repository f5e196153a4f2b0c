"""Runs and the queue in the page: every run listed; opening one shows it and puts its settings in the form (a
reloaded page too); Train again; Start while one trains queues, the queue reordered and pruned, and it goes on
with the browser closed. Checked against the run folders and the queue file on disk."""
from __future__ import annotations

import json

import pytest

from page_tools import (TRAIN_TIMEOUT_S, demo_files, field, new_dataset, open_page, open_run, upload, wait_file,
                        wait_status, wait_value)
from trained_run import RUN, SAMPLE_EVERY, STEPS
from trainer.events import read_events

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def runs_row(page, name: str, state: str = "") -> str:
    """The Runs list's line for a run, as the page shows it once it lists the run (in `state`, when given: the table
    re-renders row by row when runs are added, so a single read can pair one run's name with another's cells)."""
    found = page.wait_for_function(
        """([name, state]) => { const cell = [...document.querySelectorAll('#runs-table td, #runs-table [role=gridcell]')]
             .find(e => e.textContent.trim() === name && e.offsetParent !== null);
           const row = cell && cell.closest('tr, [role=row]');
           const text = row ? [...row.children].map(c => c.textContent.trim()).join(' | ') : null;
           return text && text.includes(state) ? text : null; }""",
        arg=[name, state], timeout=30_000)
    return found.json_value()


def test_opening_a_run_shows_its_settings_and_train_again_renames(trained, studio, browser, shots):
    page = open_page(browser, studio.url, shots)
    # a (re)opened page: the form shows the settings of the run on screen, whichever it is
    on_screen = page.locator("#train-status-text").get_attribute("data-run")
    assert field(page, "lora-name").input_value() == on_screen
    open_run(page, RUN)
    wait_value(page, "lora-name", f"^{RUN}$", 30)
    assert field(page, "set-training-steps").input_value() == str(STEPS)
    page.get_by_text("Advanced").click()
    assert field(page, "set-sample-every-n-steps").input_value() == str(SAMPLE_EVERY)
    assert field(page, "preset").input_value() == "", "the preset is cleared: the form shows the run's own values"
    row = runs_row(page, RUN)
    assert f"{STEPS}/{STEPS}" in row and "finished" in row and "demo-style" in row and "Demo model" in row
    assert "Checkpoints: step" in field(page, "run-info").input_value()
    shots.take(page, "run-opened")
    page.locator("#train-again").click()
    wait_value(page, "lora-name", f"^{RUN}-2$", 30)
    assert "press Start" in field(page, "train-action").input_value()


def test_start_while_training_queues_and_the_queue_goes_on_without_the_browser(studio, browser, shots):
    runs, queue_file = studio.outputs_dir / "runs", studio.outputs_dir / "runs" / "queue.json"
    page = open_page(browser, studio.url, shots)
    new_dataset(page, "queue-set")
    upload(page, demo_files())
    wait_value(page, "dataset-report", "Usable: yes", 120)
    for name, steps in (("q-first", 2000), ("q-second", 3), ("q-third", 3)):
        field(page, "lora-name").fill(name)
        field(page, "set-training-steps").fill(str(steps))
        field(page, "set-training-steps").press("Tab")
        page.locator("#start").click()
        if name == "q-first":
            wait_status(page, ("starting", "running"), 60, run=name)
        else:  # what the user reads after each click, before the next name is typed
            wait_value(page, "train-action", f"Queued '{name}' \\(")
    wait_value(page, "train-action", "Queued 'q-third' \\(number 2 in the queue\\): it starts when 'q-first' ends")
    assert json.loads(queue_file.read_text()) == ["q-second", "q-third"]
    assert "queued" in runs_row(page, "q-second", "queued")
    shots.take(page, "queued")
    open_run(page, "q-third")
    page.locator("#queue-up").click()
    wait_value(page, "train-action", "Moved 'q-third' up")
    assert json.loads(queue_file.read_text()) == ["q-third", "q-second"]
    open_run(page, "q-second")
    page.locator("#queue-remove").click()
    wait_value(page, "train-action", "Removed 'q-second' from the queue")
    assert json.loads(queue_file.read_text()) == ["q-third"]
    wait_file(runs / "q-first", lambda run: any(ev["event"] == "step" for ev in read_events(run)), TRAIN_TIMEOUT_S)
    page.locator("#stop").click()  # the running one is stopped: the queue goes on with the next
    wait_value(page, "train-action", "Stopping 'q-first'")
    page.context.close()  # the browser goes away; the queue lives in the app
    shots.pages.clear()

    def finished(run):
        return any(ev["event"] == "done" for ev in read_events(run))
    wait_file(runs / "q-third", finished, TRAIN_TIMEOUT_S)
    assert not (runs / "q-second" / "train.log").exists(), "a removed run never starts"
    first_end = next(ev["t"] for ev in read_events(runs / "q-first") if ev["event"] == "stopped")
    assert read_events(runs / "q-third")[0]["t"] >= first_end, "one training at a time, in queue order"
    page = open_page(browser, studio.url, shots)
    assert "finished" in runs_row(page, "q-third", "finished")
    assert "not started" in runs_row(page, "q-second", "not started")
    assert "stopped" in runs_row(page, "q-first", "stopped")
    shots.take(page, "queue-done")
