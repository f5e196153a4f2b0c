"""Train the two demo LoRAs and measure what they do to generated pictures: the numbers behind presets/demo.toml.

    .venv/bin/python scripts/measure_demo_loras.py [--out DIR] [--set training.steps=800 ...]

Each LoRA (datasets/demo-style, datasets/demo-character) is trained on models/demo with the demo preset plus any
--set overrides (section.key=JSON value), then pictures for held-out prompts are generated at fixed seeds at LoRA
weights 0, 0.5 and 1, and both stacked. Printed per weight: the mean stripe score (style), the mean character
score (IoU of the silhouette with the mushroom template), "drawn" (the share of pictures whose figure fits the
mushroom best of the world's six figures) and the mean colour score (content); a grid of every picture goes to
DIR/grid.png, one row per (LoRA, weight).

What it showed on the demo base of 2026-12-05 with the preset (lr 5e-3, 500 steps, rank 8, batch 4; the style
sets with 8 plain pictures captioned without the trigger word; --threads 1, 200-290 s per LoRA on a shared CPU):
- stop 27, the style sets' first and third pictures swapped (a blue triangle on gray first, for the run's
  samples): stripes 0.03 / 0.03 / 0.05 / 0.11 / 0.34, colour kept 1.0, shape right 0.75, outline IoU 0.80 (in
  place 0.60); checks 0.38; character drawn 0.88; stacked stripes 0.37, drawn 0.75, colour kept 0.88. Rotating the
  sets by two pictures instead kept the yellow diamond's colour in only 4 of 8 pictures over 8 seeds (28/32): the
  batches' order is a draw of its own.
- before that, demo-style over weights 0 / 0.25 / 0.5 / 0.75 / 1: stripes 0.03 / 0.03 / 0.04 / 0.09 / 0.26, colour kept
  0.5 → 1.0 (the base guesses wrong at the unknown trigger word; the LoRA restores the colour), shape right
  0.62 → 0.75, silhouette IoU with weight 0 falling to 0.57 (the figure is redrawn, not only filled).
- demo-checks: check score 0.03 → 0.37 with colour kept 1.0 and shape right 0.62 → 0.75; each style's pictures
  score higher on their own pattern than on the other's (stripes LoRA 0.257 stripes / 0.218 checks, checks LoRA
  0.372 checks / 0.325 stripes).
- demo-character: likeness 0.57 → 0.75 → 0.77 at 0 / 0.5 / 1, drawn 0.12 → 0.88, colour kept 1.0.
- both stacked: stripes 0.04 → 0.36, drawn 0.00 → 0.75, colour kept 0.5 → 0.75.
- The same at lr 7e-3: stripes 0.30, checks 0.43, but shape right 0.50 / 0.38 (the held-out shapes redrawn) and
  the character drawn 0.75. Without the plain pictures (16 striped, every caption with the trigger word), lr 7e-3
  gave stripes 0.10 and checks 0.09: the word was tied to everything in the pictures, not to their fill.
- Learning rates on this base without the plain pictures (same protocol): 3e-3 stripes 0.08; 5e-3 0.08
  (character drawn 0.88); 1e-2 0.08-0.13 with the held-out shapes redrawn as blobs (shape right 0.25) and the
  character drawn in 0.5. LoCon
  (network.conv_rank 8) at 1e-2 reached 0.19-0.21 but broke shapes likewise. The rendered stripes score 0.40
  and the autoencoder's round trip 0.31: generated stripes wobble, which the row-based score counts only in part.
- On the first demo base (blurry, 2026-11) the same script measured stripes 0.24 at lr 3e-3, on blobs: the colour
  kept in 4 of 8 pictures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import numpy as np
import torch
from PIL import Image

from trainer.config import PROJECT_ROOT as ROOT
from trainer.demo import metrics, world
from trainer.demo.evaluate import (SEEDS, STYLE_WEIGHTS, character_prompts, demo_config, pictures,
                                   style_prompts, style_sweep)
from trainer.generate import Generator
from trainer.loop import train
from trainer.models import DEMO_MODEL_DIR


def overrides(pairs: list[str]) -> dict:
    sections: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.partition(".")
        if not name or not value:
            raise SystemExit(f"--set {pair!r}: write section.key=value, e.g. training.steps=800")
        try:
            parsed = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            parsed = value  # a bare word: scheduler=cosine
        sections.setdefault(section, {})[name] = parsed
    return sections


def train_lora(dataset: str, out: Path, extra: dict) -> Path:
    start = time.time()
    path = train(demo_config(dataset, out, extra))
    print(f"{dataset}: trained in {time.time() - start:.0f} s", flush=True)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo-measure"))
    ap.add_argument("--set", action="append", default=[], help="a config override, section.key=value")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    loras = {name: train_lora(name, out, overrides(args.set)) for name in world.DEMO_SETS}

    gen = Generator()
    gen.load(DEMO_MODEL_DIR)
    report = {}
    for dataset in world.STYLES:
        report[dataset] = style_sweep(gen, dataset, loras[dataset])
        for weight, row in report[dataset].items():
            print(f"{dataset:14s} w={weight:<5g} pattern {row['pattern']:.3f}  colour kept {row['colour_kept']:.2f}  "
                  f"shape IoU {row['shape_kept']:.2f}  in place {row['place_kept']:.2f}  "
                  f"shape right {row['shape_right']:.2f}", flush=True)
    character, character_colours = character_prompts()
    stacked = [p + f", {world.STYLE_TRIGGER}" for p in character]
    runs = [(f"demo-style w={w}", style_prompts()[0], style_prompts()[1], [(loras["demo-style"], w)])
            for w in STYLE_WEIGHTS]
    runs += [(f"demo-checks w={w}", style_prompts("demo-checks")[0], style_prompts()[1],
              [(loras["demo-checks"], w)]) for w in STYLE_WEIGHTS]
    runs += [(f"demo-character w={w}", character, character_colours, [(loras["demo-character"], w)])
             for w in (0.0, 0.5, 1.0)]
    runs += [("stacked w=0", stacked, character_colours, []),
             ("stacked w=1+1", stacked, character_colours,
              [(loras["demo-style"], 1.0), (loras["demo-character"], 1.0)])]
    rows = []
    for label, prompts, colours, mix in runs:
        images = pictures(gen, prompts, mix)
        scores = metrics.mean_scores(images, [c for c in colours for _ in SEEDS])
        kept = np.mean([metrics.commonest_colour(im) == c for im, c in zip(images, [c for c in colours for _ in SEEDS])])
        report[label] = {**scores, "colour_kept": float(kept)}
        print(f"{label:24s} stripes {scores['stripes']:.3f}  checks {scores['checks']:.3f}  character "
              f"{scores['character']:.3f}  drawn {scores['drawn']:.2f}  colour {scores['colour']:.3f}  "
              f"colour kept {kept:.2f}", flush=True)
        rows.append(images)
    grid = Image.new("RGB", (world.SIZE * len(rows[0]), world.SIZE * len(rows)))
    for r, images in enumerate(rows):
        for i, image in enumerate(images):
            grid.paste(image, (i * world.SIZE, r * world.SIZE))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out / "grid.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"grid: {out / 'grid.png'}; numbers: {out / 'report.json'}")


if __name__ == "__main__":
    main()
