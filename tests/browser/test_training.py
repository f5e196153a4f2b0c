"""Training as a user does it in the page, on the session's one trained run (trained_run.py): the upload, the
report, progress, Stop and Resume, the run in view while training, samples, the loss plot and the download.
Each claim is checked against something outside the page too: the run's files, events and the LoRA's bytes."""
from __future__ import annotations

import re
import time
from collections import defaultdict

import pytest
from safetensors import safe_open

from page_tools import coloured_pixels, demo_files, open_page, open_run, wait_status
from trained_run import RUN
from trainer.events import read_events

KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_the_upload_lands_in_the_named_dataset_and_is_reported(trained):
    files = demo_files()
    assert trained.upload_message.startswith(f"Saved {len(files)} file(s)")
    images = sorted(p.split("/")[-1] for p in files if p.endswith(".png"))
    assert sorted(p.name for p in trained.dataset_dir.glob("*.png")) == images
    assert f"{len(images)} images" in trained.report


def test_stop_saves_a_checkpoint_and_resume_continues_from_it(trained):
    assert 0 < trained.stopped_at < trained.total
    assert any(trained.run_dir.glob("checkpoints/step_*"))
    events = read_events(trained.run_dir)
    starts = [i for i, ev in enumerate(events) if ev["event"] == "start"]
    assert len(starts) == 2 and events[starts[1]].get("resumed_from")
    assert next(ev["step"] for ev in events[starts[1]:] if ev["event"] == "step") == trained.stopped_at + 1
    assert events[-1]["event"] == "done"


def test_a_resumed_run_shows_no_stale_speed_or_time_left(trained):
    assert all("time left" not in t and "it/s" not in t for t in trained.starting_texts), trained.starting_texts


def test_status_loss_and_samples_stay_in_view_while_training(trained):
    assert all(trained.visible_while_training.values()), trained.visible_while_training


def test_the_finished_run_shows_samples_loss_and_downloads_its_lora(trained, studio, browser, shots, tmp_path):
    page = open_page(browser, studio.url, shots)
    open_run(page, RUN)
    wait_status(page, ("done",), 30, run=RUN)
    expected = sum(len(ev["paths"]) for ev in read_events(trained.run_dir) if ev["event"] == "sample")
    assert expected >= 2, "the trainer made samples every 100 steps"
    page.wait_for_function(f"document.querySelectorAll('#samples img').length >= {expected}", timeout=30_000)
    assert page.locator("#samples img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=30_000)
    # the plot's lines are drawn a few frames after its canvas appears: wait for them, a bounded while
    deadline = time.time() + 30
    while coloured_pixels(page.locator("#loss-plot").screenshot()) <= 500:
        assert time.time() < deadline, "the loss plot draws its lines"
        page.wait_for_timeout(200)
    shots.take(page, "finished")
    button = page.locator("#download-trained")
    button.wait_for(state="visible", timeout=30_000)
    with page.expect_download() as info:
        button.click()
    downloaded = tmp_path / "downloaded.safetensors"
    info.value.save_as(downloaded)
    assert downloaded.read_bytes() == trained.lora.read_bytes()
    with safe_open(str(downloaded), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:5]
    parts = defaultdict(set)
    for k in keys:
        module, _, leaf = k.partition(".")
        parts[module].add(leaf)
    assert all(leaves == {"lora_down.weight", "lora_up.weight", "alpha"} for leaves in parts.values())
    assert any(m.startswith("lora_unet_") for m in parts) and metadata["ss_output_name"] == RUN
