"""How a demo LoRA is measured: its training config, the held-out prompts, seeds and sampler settings.

One protocol for tests/test_demo_effect.py (which asserts on it) and scripts/measure_demo_loras.py (which prints
the full sweeps for tuning presets/demo.toml), so a number from one means the same in the other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.config import PROJECT_ROOT, TrainConfig, build_config
from trainer.demo import metrics, world
from trainer.families import DEMO_MODEL_DIR

DATASETS_DIR = PROJECT_ROOT / "datasets"
SEEDS = (0, 1)
STEPS, CFG = 15, 5.0  # Euler at 15 steps already settles these 64×64 pictures
# Style prompts: three of these (colour, shape, background) triples are in neither datasets/demo-style nor
# demo-checks; the red triangle on gray is a caption of both (picture 12), with other seeds' pictures. Of the
# character prompts, orange on white is not in datasets/demo-character (the others are, but not these seeds' pictures).
STYLE_PROMPTS = [("red", "triangle", "gray"), ("green", "circle", "white"), ("blue", "square", "black"),
                 ("yellow", "diamond", "gray")]
CHARACTER_PROMPTS = [("red", "black"), ("green", "white"), ("blue", "gray"), ("orange", "white")]


def demo_config(dataset: str, out_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The demo preset on the demo model for one of world.DEMO_SETS, writing into out_dir."""
    sections = {"model": {"base_model": str(DEMO_MODEL_DIR)}, "data": {"dataset": str(DATASETS_DIR / dataset)},
                "output": {"name": dataset, "lora_dir": str(out_dir), "run_dir": str(out_dir / f"run-{dataset}")}}
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    return build_config({"preset": "demo"}, sections)


def pictures(generator, prompts: list[str], mix: list[tuple[Path, float]], seeds=SEEDS) -> list:
    """Every prompt at every seed (prompt-major) with the LoRA mix [(file, weight)]."""
    from trainer.generate import LoraSpec

    specs = [LoraSpec(str(path), weight) for path, weight in mix]
    return [generator.generate(p, specs, seed=s, steps=STEPS, cfg=CFG, sampler="euler")
            for p in prompts for s in seeds]


def sweep(generator, prompts: list[str], colours: list[str], lora: Path, score,
          weights=(0.0, 0.5, 1.0)) -> dict[float, tuple[float, float]]:
    """weight → (mean `score`, mean colour score) over prompts × seeds; colours[i] is prompt i's colour."""
    out = {}
    for weight in weights:
        images = pictures(generator, prompts, [(lora, weight)])
        per_image = [c for c in colours for _ in SEEDS]
        out[weight] = (float(np.mean([score(im) for im in images])),
                       float(np.mean([metrics.colour_score(im, c) for im, c in zip(images, per_image)])))
    return out


def style_prompts(dataset: str = "demo-style") -> tuple[list[str], list[str]]:
    trigger = world.STYLES[dataset][1]
    return [world.style_prompt(c, s, b, trigger) for c, s, b in STYLE_PROMPTS], [c for c, _, _ in STYLE_PROMPTS]


PATTERN_SCORES = {"stripes": metrics.stripe_score, "checks": metrics.check_score}
STYLE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def style_sweep(generator, dataset: str, lora: Path, weights=STYLE_WEIGHTS) -> dict[float, dict[str, float]]:
    """A style LoRA on the held-out style prompts × SEEDS at each weight: weight → {
    "pattern": the mean score of the set's fill (stripe_score / check_score),
    "colour_kept": the share of pictures whose commonest hue is the prompted colour,
    "shape_kept": the mean IoU of the figure's outline with the same prompt and seed's at weight 0, each scaled to
        its bounding box (metrics.shape_iou: the same shape, wherever and however large it is drawn),
    "place_kept": the mean IoU of the two figures where they stand (metrics.silhouette_iou: also put in the same
        place at the same size),
    "shape_right": the share whose figure still fits the prompted shape best of the five}."""
    score = PATTERN_SCORES[world.STYLES[dataset][0]]
    prompts, colours = style_prompts(dataset)
    colours = [c for c in colours for _ in SEEDS]
    shapes = [s for _, s, _ in STYLE_PROMPTS for _ in SEEDS]
    plain = pictures(generator, prompts, [(lora, 0.0)])
    out = {}
    for weight in weights:
        images = plain if weight == 0 else pictures(generator, prompts, [(lora, weight)])
        out[weight] = {
            "pattern": float(np.mean([score(im) for im in images])),
            "colour_kept": float(np.mean([metrics.commonest_colour(im) == c for im, c in zip(images, colours)])),
            "shape_kept": float(np.mean([metrics.shape_iou(im, ref) for im, ref in zip(images, plain)])),
            "place_kept": float(np.mean([metrics.silhouette_iou(im, ref) for im, ref in zip(images, plain)])),
            "shape_right": float(np.mean([metrics.best_fit(im, world.BASE_SHAPES) == s
                                          for im, s in zip(images, shapes)]))}
    return out


def character_prompts() -> tuple[list[str], list[str]]:
    return [world.character_prompt(c, b) for c, b in CHARACTER_PROMPTS], [c for c, _ in CHARACTER_PROMPTS]


# Prompts without the character's name, to see whether a character LoRA leaves other figures alone.
OTHER_FIGURES = [("red", "triangle", "gray"), ("blue", "circle", "white"), ("green", "square", "black"),
                 ("yellow", "diamond", "gray")]


# The yardstick's seeds: 32, so that the quality's own noise is below the proof's margin (10% of the best, about
# 0.05). Its terms are shares of 4 prompts × the seeds' pictures: at 8 seeds (32 pictures) a share's standard error
# is up to 0.09 and the demo character's checkpoints swung 0.33-0.51; at 32 seeds (128) it is at most 0.044. Measured
# on one 4x-long run's checkpoints (stop 27): the character's best checkpoint at 8 seeds was 0.51 and the step-200
# one 0.44, outside the margin; at 32 seeds 0.50 and 0.48, inside it. About 2 minutes per checkpoint on one core.
TRUTH_SEEDS = tuple(range(32))
RENDERED_STRIPES = 0.40  # stripe_score of the world's own striped renders (scripts/measure_demo_base.py: 0.402)


def true_quality(generator, dataset: str, lora: Path, seeds=TRUTH_SEEDS) -> dict[str, float]:
    """What a demo LoRA is worth, from what is known about the world (the recommendation's yardstick):
    quality = learnt × colour kept × shape kept × background kept, each a share in [0, 1] over held-out prompts ×
    seeds (TRUTH_SEEDS).
    - demo-style: learnt = stripe score / the rendered stripes' (capped at 1), colour kept = the colour score,
      shape kept = the share of pictures whose figure is the prompted shape (best_fit).
    - demo-character: learnt = the share of character prompts drawn as the mushroom, colour kept = their colour
      score, shape kept = the share of prompts without the name (OTHER_FIGURES) still drawn as their shape.
    - background kept: the share of all those pictures on the prompted background (metrics.background_right). An
      overcooked LoRA washes gray out to white and tints white: the prompt asked for neither, and every feature
      measure of the pictures sees it (stop 26: a 4x-long character run drew mushrooms on the wrong background)."""
    def each(values):  # per picture: every prompt's value at every seed (pictures() is prompt-major)
        return [v for v in values for _ in seeds]

    if dataset == "demo-style":
        images = pictures(generator, style_prompts()[0], [(lora, 1.0)], seeds)
        learnt = min(1.0, float(np.mean([metrics.stripe_score(im) for im in images])) / RENDERED_STRIPES)
        colours, backgrounds = each([c for c, _, _ in STYLE_PROMPTS]), each([b for _, _, b in STYLE_PROMPTS])
        shape_images, shapes = images, each([s for _, s, _ in STYLE_PROMPTS])
    else:
        images = pictures(generator, character_prompts()[0], [(lora, 1.0)], seeds)
        learnt = float(np.mean([metrics.best_fit(im) == world.CHARACTER_SHAPE for im in images]))
        colours, backgrounds = each([c for c, _ in CHARACTER_PROMPTS]), each([b for _, b in CHARACTER_PROMPTS])
        others = [world.style_prompt(c, s, b).replace(f", {world.STYLE_TRIGGER}", "") for c, s, b in OTHER_FIGURES]
        shape_images, shapes = pictures(generator, others, [(lora, 1.0)], seeds), each([s for _, s, _ in OTHER_FIGURES])
        backgrounds += each([b for _, _, b in OTHER_FIGURES])
    colour = float(np.mean([metrics.colour_score(im, c) for im, c in zip(images, colours)]))
    kept = float(np.mean([metrics.best_fit(im, world.BASE_SHAPES) == s for im, s in zip(shape_images, shapes)]))
    drawn = images if shape_images is images else images + shape_images  # every picture made, each once
    background = float(np.mean([metrics.background_right(im, b) for im, b in zip(drawn, backgrounds, strict=True)]))
    return {"learnt": learnt, "colour": colour, "shape": kept, "background": background,
            "quality": learnt * colour * kept * background}
