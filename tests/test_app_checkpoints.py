"""A run's checkpoints in the UI (app/checkpoints.py, app/evaluation_view.py): read from a run folder written as
the trainer writes it, the recommended one marked, "Keep this one" copies the file byte for byte beside its
preview without touching the run's final LoRA; the Train tab's base | latest pairs and the measures' chart."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from app import checkpoints as ck
from app import evaluation_view as ev
from app.errors import UserError


def write_run(root: Path) -> Path:
    run = root / "runs" / "my-style"
    (run / "loras").mkdir(parents=True)
    (run / "samples").mkdir()
    events = []
    for step in (0, 50, 100):
        paths = []
        for i in range(2):
            p = run / "samples" / f"step_{step:06d}_{i}.png"
            Image.new("RGB", (8, 8), (step, i * 100, 0)).save(p)
            paths.append(str(p))
        events.append({"event": "sample", "step": step, "paths": paths, "prompts": ["a red circle", "a blue circle"]})
    for step, likeness in ((50, 0.8), (100, 0.9)):
        lora = run / "loras" / f"my-style-step{step:06d}.safetensors"
        lora.write_bytes(f"weights of step {step}".encode())
        events.append({"event": "evaluation", "step": step, "lora": str(lora), "likeness": likeness,
                       "strength": 0.1, "leak": 0.01 * step / 50, "validation_loss": 0.2})
        events.append({"event": "recommendation", "step": 50, "lora": str(run / "loras" / "my-style-step000050.safetensors"),
                       "reason": "the earliest checkpoint near the best likeness"})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_checkpoints_are_listed_with_their_measures_and_the_recommended_one(tmp_path):
    run = write_run(tmp_path)
    found = ck.run_checkpoints(run)
    assert [(c.step, c.recommended) for c in found] == [(50, True), (100, False)]
    table = ck.checkpoint_table(found)
    assert table["likeness"].tolist() == [0.8, 0.9] and table["recommended"].tolist() == ["★ recommended", ""]
    assert ck.runs_with_checkpoints(tmp_path / "runs") == ["my-style"]
    labels = [label for label, _ in ck.checkpoint_choices(tmp_path / "runs")]
    assert labels == ["my-style · step 50 ★", "my-style · step 100"]


def test_keep_copies_the_checkpoint_and_its_sample_and_leaves_the_final_lora(tmp_path):
    run = write_run(tmp_path)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    final = lora_dir / "my-style.safetensors"
    final.write_bytes(b"final weights")
    source = run / "loras" / "my-style-step000050.safetensors"
    kept = ck.keep(source, lora_dir)
    assert kept == lora_dir / "my-style-step000050.safetensors"
    assert kept.read_bytes() == source.read_bytes() and final.read_bytes() == b"final weights"
    preview = lora_dir / "my-style-step000050.preview.png"
    assert preview.read_bytes() == (run / "samples" / "step_000050_0.png").read_bytes()
    assert not list(lora_dir.glob(".*.tmp"))
    # a checkpoint without a sample at its step: the picture its evaluation drew is the preview
    for sample in (run / "samples").glob("step_000100_*.png"):
        sample.unlink()
    (run / "evaluation").mkdir()
    Image.new("RGB", (8, 8), "red").save(run / "evaluation" / "step_000100_0.png")
    ck.keep(run / "loras" / "my-style-step000100.safetensors", lora_dir)
    assert (lora_dir / "my-style-step000100.preview.png").read_bytes() == \
        (run / "evaluation" / "step_000100_0.png").read_bytes()
    with pytest.raises(UserError, match="already in the LoRA folder"):
        ck.keep(source, lora_dir)
    with pytest.raises(UserError, match="not a checkpoint"):
        ck.keep(final, tmp_path / "elsewhere")


def test_base_beside_latest_then_older_samples(tmp_path):
    run = write_run(tmp_path)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    items = ev.side_by_side(events)
    captions = [c for _, c in items]
    assert captions[:4] == ["base · #1", "step 100 · #1", "base · #2", "step 100 · #2"]
    assert captions[4:] == ["step 50 · #1", "step 50 · #2"]
    assert ev.sample_prompts(events) == ["a red circle", "a blue circle"]  # the numbers' legend
    assert items[0][0].endswith("step_000000_0.png") and items[1][0].endswith("step_000100_0.png")


def test_chart_and_recommendation_text(tmp_path):
    run = write_run(tmp_path)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    frame = ev.evaluation_frame(events)
    likeness = frame[frame["measure"].str.startswith("likeness")]
    assert likeness["step"].tolist() == [50, 100] and likeness["value"].tolist() == [0.8, 0.9]
    assert set(frame["measure"]) == set(ev.MEASURES.values())
    text = ev.recommendation_html(events)
    assert 'data-step="50"' in text and "earliest checkpoint" in text
    assert ev.evaluation_frame([]) is None and 'data-step=""' in ev.recommendation_html([])


def test_the_app_builds_with_both_blocks(tmp_path):
    from app.folders import Folders
    from app.main import build_app

    write_run(tmp_path / "outputs")
    demo = build_app(Folders.create(tmp_path / "models", tmp_path / "outputs"))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"base-latest", "evaluation-plot", "keep-recommended", "checkpoint-table", "keep-checkpoint"} <= ids


def test_the_train_tab_poll_sends_only_when_the_run_grows(tmp_path):
    run = write_run(tmp_path)

    class OneRun:  # app.jobs.Jobs as the block uses it: the run to show
        def current(self):
            return run

    pairs, frame, text, stamp = ev.refresh(OneRun(), ())
    assert len(pairs["value"]) == 6 and frame is not None and 'data-step="50"' in text
    assert pairs["label"].endswith("#1: a red circle; #2: a blue circle")  # what the captions number
    again = ev.refresh(OneRun(), stamp)
    assert again[3] == stamp and all(x == gr.skip() for x in again[:3])
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "recommendation", "step": 100, "lora": "x", "reason": "later"}) + "\n")
    assert 'data-step="100"' in ev.refresh(OneRun(), stamp)[2]


def test_the_evidence_follows_the_run_on_screen_and_keep_takes_its_recommendation(tmp_path):
    """Two runs: the one opened on the page is shown and kept from, not the newest or running one."""
    from app.folders import Folders

    opened = write_run(tmp_path)
    newest = opened.parent / "other-run"
    newest.mkdir()
    (newest / "config.toml").write_text("")
    (newest / "events.jsonl").write_text(json.dumps({"event": "recommendation", "step": 7, "lora": "",
                                                     "reason": "x"}) + "\n")
    (opened / "config.toml").write_text("")

    class TwoRuns:  # app.jobs.Jobs as the block uses it
        runs_dir = opened.parent

        def current(self):
            return newest

    assert 'data-step="7"' in ev.refresh(TwoRuns(), ())[2]  # nothing opened: the running/newest run
    pairs, _, text, _ = ev.refresh(TwoRuns(), (), "my-style")
    assert len(pairs["value"]) == 6 and 'data-step="50"' in text
    folders = Folders.create(tmp_path / "models", tmp_path / "outputs")
    message = ev.keep_recommended(TwoRuns(), folders, "my-style")
    assert "step 50" in message
    assert (folders.lora_dir / "my-style-step000050.safetensors").read_bytes() == b"weights of step 50"
