"""Evaluate a run's checkpoint LoRAs after the fact, as training does at each checkpoint, and say which to use.

    .venv/bin/python scripts/evaluate_checkpoints.py RUN_DIR [--truth demo-style|demo-character]

RUN_DIR is a run folder (its config.toml names the base model and dataset; its loras/ folder or checkpoints/
hold the checkpoint files). For each checkpoint: strength, leak, likeness (trainer/eval_metrics.py) and the
recommendation rule (trainer/recommend.py). With --truth, a demo run's true quality per checkpoint too
(trainer/demo/evaluate.true_quality), to check the rule against what is known.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer import eval_metrics as em  # noqa: E402
from trainer.caches import encode_latents  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.judge import training_picture  # noqa: E402
from trainer.evaluation import Evaluator, default_sample_prompts, evaluation_prompts, trigger_words  # noqa: E402
from trainer.generate import Generator, LoraSpec  # noqa: E402
from trainer.models import default_base_model  # noqa: E402
from trainer.recommend import recommend  # noqa: E402


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    files = list((run_dir / "loras").glob("*-step*.safetensors")) or list(run_dir.glob("checkpoints/*/*.safetensors"))
    found = [(int(re.search(r"-step(\d+)", f.stem).group(1)), f) for f in files if re.search(r"-step(\d+)", f.stem)]
    return sorted(found)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--truth", choices=["demo-style", "demo-character"])
    ap.add_argument("--final", help="the run's exported LoRA, evaluated as its last checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--likeness-images", type=int, default=0, help="instead of the run's evaluation.likeness_images")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.toml")
    if args.likeness_images:
        cfg = replace(cfg, evaluation=replace(cfg.evaluation, likeness_images=args.likeness_images))
    ds = load_dataset(cfg.data, cfg.training.seed)
    gen = Generator()
    gen.load(cfg.model.base_model or default_base_model())
    captions = [r.caption for r in ds.images]
    sample = cfg.sample.prompts or default_sample_prompts(captions)
    prompts = evaluation_prompts(sample, cfg.evaluation.leak_prompts, captions, lambda i: training_picture(ds, i),
                                 trigger_words(captions, cfg.data.trigger_word), cfg.evaluation.likeness_images)
    print("prompts:", prompts.sample, prompts.leak, prompts.likeness, flush=True)
    width, height = cfg.sample.width or cfg.data.resolution, cfg.sample.height or cfg.data.resolution

    def render_with(lora: Path | None):
        specs = [LoraSpec(str(lora), 1.0)] if lora else []
        # the judge's settings (trainer/judge.py: evaluation.steps Euler steps at sample.cfg), so the numbers compare
        return lambda ps, seeds: [gen.generate(p, specs, seed=s, steps=cfg.evaluation.steps, cfg=cfg.sample.cfg,
                                               width=width, height=height, sampler="euler") for p, s in zip(ps, seeds)]

    vae = gen.pipe.vae
    latents = [encode_latents(vae, em.to_pixels([im]).to(vae.device)) for im in prompts.likeness_images]

    def redraw_with(lora: Path | None):
        specs = [LoraSpec(str(lora), 1.0)] if lora else []
        return lambda seeds: gen.redraw(prompts.likeness, latents, seeds, specs, em.REDRAW_STRENGTH,
                                        em.redraw_steps(cfg.evaluation.steps), cfg.sample.cfg, cfg.model.clip_skip)

    ev = Evaluator(vae.encoder, prompts, cfg.sample.seed)
    ev.set_base(render_with(None), redraw_with(None))
    files = checkpoint_files(run_dir)
    if args.final:
        files.append((files[-1][0] + 1 if files else 0, Path(args.final)))
    records = []
    for step, path in files:
        record = {"step": step, **ev.measure(render_with(path), redraw_with(path))}
        if args.truth:
            from trainer.demo.evaluate import true_quality
            record.update({f"true_{k}": round(v, 3) for k, v in true_quality(gen, args.truth, path).items()})
        records.append(record)
        print(record, flush=True)
    print("recommendation:", recommend(records))


if __name__ == "__main__":
    main()
