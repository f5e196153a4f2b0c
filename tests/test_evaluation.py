"""The checkpoint measures on pictures whose answer is known (trainer/eval_metrics.py, trainer/validation.py), the
prompts derived from captions (trainer/evaluation.py) and the recommendation rule (trainer/recommend.py).

Pictures are rendered by the demo world (trainer/demo/world.py): the same scenes plain and striped (another
style, same content), moved (same style and content, other place), and other scenes. Features come from the
committed demo model's VAE, the network the trainer measures with.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from trainer import eval_metrics as em
from trainer.demo import world
from trainer.evaluation import default_sample_prompts, evaluation_prompts, trigger_words, variation, without
from trainer.recommend import recommend
from trainer.validation import fixed_noise, fixed_timesteps, validation_loss

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(ROOT / "models" / "demo", subfolder="vae").eval().encoder


SCENES = world.scenes(12, seed=3)


def render(scenes, fill="plain"):
    return [world.render(world.with_fill(s, fill)) for s in scenes]


def moved(scenes):
    """The same figures elsewhere, stripes at another phase: same style and content, other pixels."""
    return [replace(s, cx=world.SIZE - s.cx, cy=world.SIZE - s.cy, phase=s.phase + 5) for s in scenes]


def shifted(images, by=3):
    return [Image.fromarray(np.roll(np.asarray(im), (by, by), (0, 1))) for im in images]


def test_picture_distance_is_zero_for_the_same_picture_and_grows_with_the_change(encoder):
    plain, striped = render(SCENES), render(SCENES, "stripes")
    f = lambda images: em.vae_features(encoder, images)  # noqa: E731
    assert float(em.picture_distance(f(plain), f(plain)).abs().max()) < 1e-6
    restyled = em.picture_distance(f(plain), f(striped))
    torch.testing.assert_close(restyled, em.picture_distance(f(striped), f(plain)))  # symmetric
    # Small, not 0: stripes move this small encoder's features little (green ones least). Measured mean 0.0175 on
    # the demo VAE of 2026-12-05 (per picture 0.004-0.036), a little over 0.02 on the first one; the checks below
    # are relative.
    assert (restyled > 0).all() and float(restyled.mean()) > 0.01
    # Blends from the plain picture to the striped one: the further, the larger the distance.
    blends = [[Image.blend(a, b, w) for a, b in zip(plain, striped)] for w in (0.25, 0.5, 1.0)]
    steps = [float(em.picture_distance(f(plain), f(b)).mean()) for b in blends]
    assert steps[0] < steps[1] < steps[2]
    # Other figures, colours and backgrounds are much further than a restyle or a 3-pixel shift.
    other = float(em.picture_distance(f(striped), f(render(world.scenes(12, seed=99), "stripes"))).mean())
    shift = float(em.picture_distance(f(striped), f(shifted(striped))).mean())
    assert other > 4 * float(restyled.mean()) and other > 4 * shift


def test_likeness_is_one_for_the_training_pictures_and_zero_for_the_base(encoder):
    training = em.pictures_stats(encoder, render(SCENES, "stripes"))
    base = em.pictures_stats(encoder, render(SCENES))  # the same content without the style
    assert em.likeness(training, base, training) == pytest.approx(1.0)
    assert em.likeness(base, base, training) == pytest.approx(0.0)
    # The style in other places and stripe phases is still the style; plain figures elsewhere are not.
    style_moved = em.likeness(em.pictures_stats(encoder, render(moved(SCENES), "stripes")), base, training)
    plain_moved = em.likeness(em.pictures_stats(encoder, render(moved(SCENES))), base, training)
    assert style_moved > 0.8 and abs(plain_moved) < 0.2
    # Half the pictures striped: about half-way.
    half = render(SCENES[:6], "stripes") + render(SCENES[6:])
    assert 0.3 < em.likeness(em.pictures_stats(encoder, half), base, training) < 0.7
    # A base that already looks like the training pictures leaves nothing to measure.
    assert em.likeness(training, training, training) is None


def test_validation_loss_is_deterministic_and_zero_for_a_perfect_model():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    noise = fixed_noise(latents)
    assert [n.shape for n in noise] == [(8, 4, 8, 8)] * 3
    torch.testing.assert_close(noise[1], fixed_noise(latents)[1])  # the same inputs at every checkpoint
    t = fixed_timesteps(1000)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]  # the middle of eight equal bins

    def perfect(noisy, timesteps, images):  # knows the clean latents: recovers the noise exactly
        a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        clean = torch.stack([latents[i] for i in images])
        return (noisy - a.sqrt() * clean) / (1 - a).sqrt()

    for rows in (8, 16, 100):  # one image a call, two, all at once: the same rows
        assert validation_loss(perfect, latents, scheduler, noise, rows) < 1e-8
    zero = lambda noisy, timesteps, images: torch.zeros_like(noisy)  # noqa: E731
    expected = float(torch.cat(noise).pow(2).mean())  # predicting 0 costs the noise's own power
    assert validation_loss(zero, latents, scheduler, noise) == pytest.approx(expected, rel=1e-5)
    # a model right on one image only: the loss is the other images' share
    one = lambda noisy, timesteps, images: torch.where(  # noqa: E731
        torch.tensor(images).view(-1, 1, 1, 1) == 1, perfect(noisy, timesteps, images), torch.zeros_like(noisy))
    share = float(torch.cat([noise[0], noise[2]]).pow(2).sum()) / torch.cat(noise).numel()
    assert validation_loss(one, latents, scheduler, noise, 16) == pytest.approx(share, rel=1e-5)


def caption_list(name: str) -> list[str]:
    folder = ROOT / "datasets" / name
    return [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]


def test_prompts_from_the_demo_captions():
    style, character = caption_list("demo-style"), caption_list("demo-character")
    assert trigger_words(style, "") == ["zebrastyle"]  # the tag in every caption
    assert trigger_words(character, "") == ["zorbo"]  # the invented word in every caption
    assert trigger_words(character, "ohwx") == ["ohwx"]  # the config's word wins
    assert without("a red circle on a white background, zebrastyle", ["zebrastyle"]) == \
        "a red circle on a white background"
    assert without("zebrastyle, a red circle", ["zebrastyle"]) == "a red circle"
    assert without("a zebrastyles circle", ["zebrastyle"]) == "a zebrastyles circle"  # whole words only
    assert variation("a red zorbo on a white background") == "a blue zorbo on a white background"
    assert variation("a castle at dusk") is None
    # a variation the training captions hold is not held out: the next colour
    assert variation("a red circle", ["a blue circle"]) == "a green circle"
    sample = default_sample_prompts(style)
    # the first caption, a blue triangle on gray: red and green triangles on gray are training captions, so purple
    assert sample == [style[0], "a purple triangle on a gray background, zebrastyle"]
    assert sample[1] not in style  # held out
    loaded = []
    prompts = evaluation_prompts(sample, [], style, lambda i: loaded.append(i) or Image.new("RGB", (8, 8)),
                                 ["zebrastyle"], count=3)
    assert prompts.leak == ["a blue triangle on a gray background", "a purple triangle on a gray background"]
    assert len(prompts.likeness) == 3 and prompts.likeness[0] == style[0] and len(set(prompts.likeness)) == 3
    assert [style[i] for i in loaded] == prompts.likeness  # only the likeness pairs' pictures are loaded


def ev(step, likeness, leak, strength=0.1):
    return {"step": step, "likeness": likeness, "leak": leak, "strength": strength}


def test_recommendation_rule():
    # Likeness rises then flattens; the leak grows late: the earliest near-best checkpoint with a low leak.
    runs = [ev(100, 0.2, 0.01), ev(200, 0.82, 0.02), ev(300, 0.9, 0.03), ev(400, 0.88, 0.08), ev(500, 0.85, 0.09)]
    assert recommend(runs)["step"] == 200
    # Near the best, but leaking: skipped for a later one that does not.
    runs[1] = ev(200, 0.85, 0.07)
    assert recommend(runs)["step"] == 300
    # Every near-best checkpoint leaks: the least for its strength, and the reason says so.
    leaky = [ev(100, 0.9, 0.08, 0.1), ev(200, 0.9, 0.06, 0.1), ev(300, 0.88, 0.09, 0.1)]
    pick = recommend(leaky)
    assert pick["step"] == 200 and "none leaks less" in pick["reason"]
    assert recommend([ev(100, None, 0.0)]) is None and recommend([]) is None
    # no trigger word, no leak prompts: likeness alone decides
    unmeasured = recommend([ev(100, 0.5, None), ev(200, 0.95, None), ev(300, 1.0, None)])
    assert unmeasured["step"] == 200 and "no leak was measured" in unmeasured["reason"]
