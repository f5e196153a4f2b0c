"""Checkpoints judged during training (trainer/judge.py) on tiny real-topology models: the events a run writes,
the checkpoint LoRA files, and the in-loop measures against the same measures taken from the exported files
through diffusers' own LoRA loader (trainer.generate.Generator)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import tiny_models
from trainer import loop
from trainer.config import build_config
from trainer.evaluation import Evaluator
from trainer.events import read_events
from trainer.generate import Generator, LoraSpec
from trainer.lora_file import inspect_lora, read_lora

COLOURS = ["red", "blue", "purple", "yellow"]  # "a red circle" varied: blue is a caption, green is held out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    for family in ("sd1", "sdxl"):
        tiny_models.save_diffusers(family, root / f"tiny-{family}")
    data = root / "data"
    data.mkdir()
    for i, colour in enumerate(COLOURS):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=colour)
        im.save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a {colour} circle, sks")
    return root


def config(ws: Path, name: str, family: str = "sd1", **sections):
    layers = {
        "model": {"base_model": str(ws / f"tiny-{family}")},
        "data": {"dataset": str(ws / "data"), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
        "network": {"rank": 4, "alpha": 4.0},
        "optimizer": {"learning_rate": 1e-2},
        "training": {"steps": 4, "mixed_precision": "no", "seed": 7},
        "sample": {"steps": 2, "every_n_steps": 2},
        "evaluation": {"steps": 3},
        "output": {"name": name, "lora_dir": str(ws / "loras"), "run_dir": str(ws / "runs" / name),
                   "save_precision": "fp32", "save_every_n_steps": 2},
    }
    for section, values in sections.items():
        layers[section] = {**layers.get(section, {}), **values}
    return build_config(layers)


def test_a_run_writes_base_samples_checkpoint_loras_evaluations_and_a_recommendation(workspace):
    cfg = config(workspace, "judged", data={"validation_split": 0.25})
    loop.train(cfg)
    events = read_events(cfg.run_path())
    samples = [e for e in events if e["event"] == "sample"]
    assert samples[0]["step"] == 0  # the base model's pictures come first, same prompts as later samples
    assert samples[0]["prompts"] == samples[-1]["prompts"] == ["a red circle, sks", "a green circle, sks"]
    evaluations = [e for e in events if e["event"] == "evaluation"]
    assert [e["step"] for e in evaluations] == [2, 4]  # every checkpoint, and the final LoRA
    for e in evaluations:
        assert Path(e["lora"]).name == f"judged-step{e['step']:06d}.safetensors" and Path(e["lora"]).is_file()
        assert inspect_lora(e["lora"])["metadata"]["ss_steps"] == str(e["step"])
        assert e["validation_on"] == "held-out images" and e["validation_loss"] > 0
        assert e["strength"] > 0 and e["leak"] is not None and e["likeness"] is not None
        assert [Image.open(p).size for p in e["pictures"]] == [(64, 64)] * 2  # what it measured, to look at
    recommendations = [e for e in events if e["event"] == "recommendation"]
    assert len(recommendations) == 2 and recommendations[-1]["step"] in (2, 4) and recommendations[-1]["reason"]
    # a quarter of the images held out: the dataset trained on three
    start = next(e for e in events if e["event"] == "start")
    assert start["steps_per_epoch"] == 3


def test_in_loop_measures_equal_those_of_the_exported_files(workspace):
    """The judge draws (and redraws) with the training modules; the same prompts and seeds drawn by diffusers'
    pipeline with the exported LoRA file loaded give the same strength, leak and likeness."""
    cfg = config(workspace, "checked")
    loop.train(cfg)
    events = read_events(cfg.run_path())
    last = [e for e in events if e["event"] == "evaluation"][-1]
    gen = Generator()
    gen.load(cfg.model.base_model)
    from trainer.data import load_dataset
    from trainer.evaluation import default_sample_prompts, evaluation_prompts, trigger_words
    from trainer.judge import training_picture

    ds = load_dataset(cfg.data, cfg.training.seed)
    captions = [r.caption for r in ds.images]
    prompts = evaluation_prompts(default_sample_prompts(captions), [], captions, lambda i: training_picture(ds, i),
                                 trigger_words(captions, ""), cfg.evaluation.likeness_images)
    ev = Evaluator(gen.pipe.vae.encoder, prompts, cfg.sample.seed)

    def render(lora):
        specs = [LoraSpec(str(lora), 1.0)] if lora else []
        return lambda ps, seeds: [gen.generate(p, specs, seed=s, steps=cfg.evaluation.steps, cfg=cfg.sample.cfg,
                                               width=64, height=64) for p, s in zip(ps, seeds)]

    from trainer import eval_metrics as em
    from trainer.caches import encode_latents

    latents = [encode_latents(gen.pipe.vae, em.to_pixels([im])) for im in prompts.likeness_images]

    def redraw(lora):
        specs = [LoraSpec(str(lora), 1.0)] if lora else []
        return lambda seeds: gen.redraw(prompts.likeness, latents, seeds, specs, em.REDRAW_STRENGTH,
                                        em.redraw_steps(cfg.evaluation.steps), cfg.sample.cfg)

    ev.set_base(render(None), redraw(None))
    measured = ev.measure(render(last["lora"]), redraw(last["lora"]))
    assert measured["strength"] > 0.001  # the LoRA changes the pictures: a comparison that could fail
    for key in ("strength", "leak", "likeness"):
        assert measured[key] == pytest.approx(last[key], rel=0.02, abs=1e-3), key


def test_sdxl_and_a_trained_text_encoder_are_judged(workspace):
    cfg = config(workspace, "judged-xl", family="sdxl", network={"train_text_encoder": True},
                 training={"steps": 2}, output={"save_every_n_steps": 1})
    loop.train(cfg)
    evaluations = [e for e in read_events(cfg.run_path()) if e["event"] == "evaluation"]
    assert [e["step"] for e in evaluations] == [1, 2]
    assert all(e["validation_on"] == "training images" and torch.isfinite(torch.tensor(e["validation_loss"]))
               for e in evaluations)
    # the text encoder trains: its LoRA changes the validation conditioning, so the losses differ by step
    assert evaluations[0]["validation_loss"] != evaluations[1]["validation_loss"]


def test_evaluation_changes_nothing_in_training(workspace):
    """Off: no evaluation events; on or off, the same LoRA (the judge draws from its own generators)."""
    cfg = config(workspace, "unjudged", evaluation={"at_checkpoints": "off"})
    unjudged = loop.train(cfg)
    kinds = {e["event"] for e in read_events(cfg.run_path())}
    assert "evaluation" not in kinds and "recommendation" not in kinds and "checkpoint" in kinds
    judged = loop.train(config(workspace, "judged-too"))
    a, b = read_lora(unjudged)[0], read_lora(judged)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
