"""Measure what the demo base model draws: the numbers in models/demo/README.md and the README.

    .venv/bin/python scripts/measure_demo_base.py [--model models/demo] [--cfg X --steps N] [--grid out.png]
        [--more-seeds K]

With no --cfg/--steps it uses what a newcomer gets: the Generator's defaults for this model (the CLI's and the
Gallery's). Over the 30 prompts of tests/test_demo_world.py (each base shape in six colour/background pairs, one
seed each) it counts the pictures whose figure is the prompted shape (best-fitting silhouette), whose commonest
hue is the prompted colour, and whose background is the prompted one, and measures edge crispness
(metrics.edge_width: about 0.8 for the world's own rendering). It also measures the autoencoder alone (encode,
decode) on rendered world pictures, plain and striped: the ceiling for everything the model and its LoRAs draw.
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

PAIRS = [("red", "white"), ("blue", "black"), ("green", "gray"), ("purple", "white"), ("yellow", "black"),
         ("orange", "gray")]


def prompts() -> list[tuple[str, str, str, int]]:
    """(shape, colour, background, seed) of the 30 base prompts, as tests/test_demo_world.py draws them."""
    return [(shape, c, b, 10 * i + j) for i, shape in enumerate(world.BASE_SHAPES) for j, (c, b) in enumerate(PAIRS)]


def judge(image, shape: str, colour: str, bg: str) -> dict[str, float]:
    return {"shape": float(metrics.best_fit(image, world.BASE_SHAPES) == shape),
            "colour": float(metrics.commonest_colour(image) == colour),
            "background": float(metrics.background_right(image, bg)),
            "edge": metrics.edge_width(image)}


def measure_base(generator, steps: int | None = None, cfg: float | None = None, offset: int = 0) -> tuple[dict, list]:
    """Counts over the 30 prompts and the pictures; steps/cfg None = the Generator's defaults for the model; offset:
    added to every prompt's seed (other pictures of the same prompts)."""
    kwargs = {k: v for k, v in (("steps", steps), ("cfg", cfg)) if v is not None}
    rows, images = [], []
    for shape, colour, bg, seed in prompts():
        image = generator.generate(f"a {colour} {shape} on a {bg} background", [], seed=seed + offset, **kwargs)
        rows.append(judge(image, shape, colour, bg))
        images.append(image)
    total = {k: int(sum(r[k] for r in rows)) for k in ("shape", "colour", "background")}
    total["edge_width"] = round(float(np.nanmean([r["edge"] for r in rows])), 2)
    return total, images


def measure_autoencoder(vae, n: int = 48, seed: int = 5) -> dict[str, float]:
    """Edge width, stripe score and colour score of world pictures after the autoencoder's round trip."""
    scenes = world.scenes(n, seed)
    out = {}
    for fill in world.FILLS:
        pics = [world.render(world.with_fill(s, fill)) for s in scenes]
        x = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pics]) / 127.5 - 1).permute(0, 3, 1, 2)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
        back = [Image.fromarray(a) for a in
                ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
        out[f"{fill}_edge_width"] = round(float(np.nanmean([metrics.edge_width(b) for b in back])), 2)
        out[f"{fill}_colour"] = round(float(np.mean([metrics.colour_score(b, s.colour) for b, s in zip(back, scenes)])), 3)
        if fill == "stripes":
            out["stripes_score"] = round(float(np.mean([metrics.stripe_score(b) for b in back])), 3)
            out["stripes_score_rendered"] = round(float(np.mean([metrics.stripe_score(p) for p in pics])), 3)
    return out


def grid(images, path: Path) -> None:
    cols = len(PAIRS)
    sheet = Image.new("RGB", (world.SIZE * cols, world.SIZE * len(images) // cols))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * world.SIZE, (i // cols) * world.SIZE))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(path)


def main(argv=None) -> None:
    from trainer.generate import Generator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--grid", default="", help="write the 30 pictures here (rows: shapes; columns: PAIRS)")
    ap.add_argument("--more-seeds", type=int, default=0,
                    help="also count the 30 prompts at this many more seed offsets (+1000, +2000, ...)")
    args = ap.parse_args(argv)
    start = time.time()
    gen = Generator()
    gen.load(Path(args.model))
    total, images = measure_base(gen, args.steps, args.cfg)
    for k in range(1, args.more_seeds + 1):
        total[f"seeds+{1000 * k}"] = measure_base(gen, args.steps, args.cfg, 1000 * k)[0]
    total["autoencoder"] = measure_autoencoder(gen.pipe.vae)
    total["world_edge_width"] = round(float(np.mean([metrics.edge_width(world.render(s))
                                                     for s in world.scenes(48, 5)])), 2)
    total["seconds"] = round(time.time() - start, 1)
    print(json.dumps(total, indent=1))
    if args.grid:
        grid(images, Path(args.grid))


if __name__ == "__main__":
    main()
