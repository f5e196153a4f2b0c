"""What the browser tests do to the page, as a user would: fill a field, pick from a list, wait for a state the
page shows (data-* attributes the app writes), read a toast. Every wait is on a real condition; nothing re-types
input until it sticks."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO_STYLE = ROOT / "datasets" / "demo-style"
DEMO_MODEL = ROOT / "models" / "demo"
TRAIN_TIMEOUT_S = 900  # the demo preset trains in ≤ 3 minutes on 2 idle CPU cores; room for a busy machine


def field(page, elem_id: str):
    """The text input of a gr.Textbox / gr.Number / gr.Dropdown by elem_id."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox]):not([type=range])").first


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a gr.Dropdown by the text it shows."""
    field(page, elem_id).click()
    page.locator("[role=option]", has_text=option).first.click()


def open_page(browser, url: str, shots=None, viewport=(1400, 1000)):
    """A fresh browser context on the app, once the page's first poll has arrived (the form is then settled)."""
    page = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True).new_page()
    if shots is not None:
        shots.pages.append(page)
    page.goto(url)
    page.wait_for_selector('#train-status-text[data-ready="1"]', timeout=90_000)
    return page


def status(page):
    return page.locator("#train-status-text")


def wait_status(page, statuses: tuple[str, ...], timeout_s: float, run: str | None = None):
    run_part = f'[data-run="{run}"]' if run else ""
    page.wait_for_selector(" , ".join(f'#train-status-text[data-status="{s}"]{run_part}' for s in statuses),
                           timeout=timeout_s * 1000)
    return status(page)


def wait_step_above(page, step: int, timeout_s: float = TRAIN_TIMEOUT_S) -> None:
    page.wait_for_function(f"Number(document.querySelector('#train-status-text')?.dataset.step) > {step}",
                           timeout=timeout_s * 1000)


def wait_value(page, elem_id: str, pattern: str, timeout_s: float = 60) -> str:
    """Wait until a text field's value matches `pattern` (a regular expression)."""
    page.wait_for_function(
        "([id, pattern]) => { const el = document.querySelector(`#${id} textarea, #${id} input`);"
        " return el && new RegExp(pattern).test(el.value); }", arg=[elem_id, pattern], timeout=timeout_s * 1000)
    return field(page, elem_id).input_value()


def toast(page, pattern: str, timeout_s: float = 30) -> str:
    found = page.locator(".toast-body", has_text=re.compile(pattern))
    found.first.wait_for(timeout=timeout_s * 1000)
    return found.first.inner_text()


def wait_file(path: Path, predicate, timeout_s: float = 20) -> None:
    """Wait for a file on disk to reach a state (the page wrote it): the user's action has a real effect."""
    end = time.time() + timeout_s
    while not predicate(path):
        assert time.time() < end, f"{path} did not reach the expected state"
        time.sleep(0.2)


def coloured_pixels(png: bytes) -> int:
    """Saturated pixels in a screenshot: a plot's lines are coloured, its axes and grid grey."""
    hsv = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").convert("HSV"))
    return int(((hsv[..., 1] > 100) & (hsv[..., 2] > 80)).sum())


def in_viewport(page, selector: str) -> bool:
    """The element's box lies (mostly) inside the visible window: seen without scrolling."""
    return page.locator(selector).first.evaluate(
        "el => { const r = el.getBoundingClientRect(); return r.height > 0 && r.top >= 0 &&"
        " r.top + Math.min(r.height, 120) <= window.innerHeight; }")


def demo_files() -> list[str]:
    return sorted(str(p) for p in DEMO_STYLE.iterdir() if p.suffix in (".png", ".txt"))


def new_dataset(page, name: str) -> None:
    if not page.locator("#new-dataset-name").is_visible():
        page.locator("#new-dataset").click()
    field(page, "new-dataset-name").fill(name)
    page.locator("#create-dataset").click()
    page.wait_for_function("([name]) => document.querySelector('#dataset-name input').value.startsWith(name)",
                           arg=[name], timeout=30_000)


def upload(page, files: list[str]) -> None:
    page.locator("#upload input[type=file]").set_input_files(files)


def open_run(page, name: str) -> None:
    """Pick a run in the Runs section: it becomes the run on screen."""
    choose(page, "run-picker", name)
    page.wait_for_selector(f'#train-status-text[data-run="{name}"]', timeout=30_000)
