"""The session's one trained run, made through the page as a user would: a new dataset named before uploading,
the demo style pictures uploaded, Start, Stop, Resume, to the end. What the page showed on the way is kept in
`Observed`, so each test asserts its own part (one broken assertion does not hide the others)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
import time
from pathlib import Path

import pytest

from page_tools import (DEMO_MODEL, DEMO_STYLE, TRAIN_TIMEOUT_S, demo_files, field, in_viewport, new_dataset,
                        open_page, status, upload, wait_status, wait_step_above, wait_value)

RUN = "browser-style"
STEPS = 200
SAMPLE_EVERY = 100


@dataclass
class Observed:
    run_dir: Path
    lora: Path
    dataset_dir: Path
    total: int = 0
    stopped_at: int = 0
    visible_while_training: dict = dc_field(default_factory=dict)  # element → in view at the top / scrolled
    starting_texts: list = dc_field(default_factory=list)  # status texts shown while "starting" after Resume
    upload_message: str = ""
    report: str = ""
    shots: list = dc_field(default_factory=list)


@pytest.fixture(scope="session")
def trained(studio, browser, tmp_path_factory) -> Observed:
    for path, what in ((DEMO_STYLE, "the demo style images"), (DEMO_MODEL, "the demo model")):
        if not path.exists():
            pytest.skip(f"{what} ({path}) is not there")
    shots = tmp_path_factory.mktemp("trained-shots")
    page = open_page(browser, studio.url)
    seen = Observed(studio.outputs_dir / "runs" / RUN, studio.models_dir / "Lora" / f"{RUN}.safetensors",
                    studio.outputs_dir / "datasets" / "demo-style")
    try:
        _train(page, seen, shots)
    finally:
        page.screenshot(path=str(shots / "last.png"), full_page=True)
        page.context.close()
    return seen


def _shot(page, seen: Observed, shots: Path, name: str) -> None:
    path = shots / f"{len(seen.shots):02d}-{name}.png"
    page.screenshot(path=str(path))
    seen.shots.append(path)


def _train(page, seen: Observed, shots: Path) -> None:
    new_dataset(page, "demo-style")
    files = demo_files()
    upload(page, files)
    seen.upload_message = wait_value(page, "upload-message", r"^Saved \d+ file")
    seen.report = wait_value(page, "dataset-report", "Usable: yes")
    field(page, "lora-name").fill(RUN)
    field(page, "lora-name").press("Tab")
    page.get_by_text("Advanced").click()
    for elem_id, value in (("set-training-steps", STEPS), ("set-sample-every-n-steps", SAMPLE_EVERY),
                           ("set-sample-prompts", "a red circle on a white background, zebrastyle")):
        field(page, elem_id).fill(str(value))
        field(page, elem_id).press("Tab")
    page.locator("#start").click()
    wait_status(page, ("starting", "running"), 60, run=RUN)
    wait_step_above(page, 1)
    seen.total = int(status(page).inner_text().split(" / ")[1].split()[0])
    _shot(page, seen, shots, "training")
    # while training, the run is in view at the top of the page and still after scrolling to the captions
    for where in ("top", "scrolled"):
        if where == "scrolled":  # the wheel, as a user scrolls down to the captions and the settings
            page.mouse.move(300, 500)
            page.mouse.wheel(0, 1500)
            page.wait_for_function("window.scrollY > 1000", timeout=10_000)
            _shot(page, seen, shots, "training-scrolled")
        for name, selector in (("status", "#train-status-text"), ("loss", "#loss-plot"), ("samples", "#samples")):
            seen.visible_while_training[(name, where)] = in_viewport(page, selector)
    page.locator("#stop").click()
    stopped = wait_status(page, ("stopped", "done", "error", "crashed"), 180, run=RUN)
    seen.stopped_at = int(stopped.get_attribute("data-step"))
    _shot(page, seen, shots, "stopped")
    page.locator("#resume").click()
    # until its first new step the resumed run is "starting", without the old run's speed or time left
    deadline = time.time() + TRAIN_TIMEOUT_S
    while time.time() < deadline:
        # one read of state, step and text: the panel re-renders every 2 s, so separate reads could mix two renders
        state, step, text = status(page).evaluate("el => [el.dataset.status, el.dataset.step, el.innerText]")
        if state == "starting":
            seen.starting_texts.append(text)
        if state == "running" and int(step) > seen.stopped_at:
            break
        assert state in ("stopped", "starting", "running"), text
        page.wait_for_timeout(250)  # sampling what the page shows, not retrying an input
    else:
        raise AssertionError(f"the resumed run made no new step: {status(page).inner_text()}")
    wait_status(page, ("done", "error", "crashed", "stopped"), TRAIN_TIMEOUT_S, run=RUN)
    _shot(page, seen, shots, "finished")
