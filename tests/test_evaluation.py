"""The checkpoint measures on pictures whose answer is known (trainer/eval_metrics.py, trainer/validation.py), the
prompts derived from captions (trainer/evaluation.py) and the recommendation rule (trainer/recommend.py).

Pictures are rendered by the demo world (trainer/demo/world.py): the same scenes plain, striped and checked
(other styles, same content), shifted by a few pixels, and other scenes. Features come from the
committed demo model's VAE, the network the trainer measures with.
"""
from __future__ import annotations

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
    """The likeness of redraws: the training pictures are the striped scenes, the base model's redraws of them the
    same scenes plain (what a base that never saw the style draws into their layout)."""
    def f(images):
        return em.each_features(encoder, images)

    training, base = f(render(SCENES, "stripes")), f(render(SCENES))
    assert em.likeness(training, base, training) == pytest.approx(1.0)
    assert em.likeness(base, base, training) == pytest.approx(0.0)
    # Half the pictures redrawn in the style, or every one at half strength: part of the way (measured 0.44, 0.69).
    half = em.likeness(f(render(SCENES[:6], "stripes") + render(SCENES[6:])), base, training)
    faint = em.likeness(f([Image.blend(a, b, 0.5) for a, b in zip(render(SCENES), render(SCENES, "stripes"))]),
                        base, training)
    assert 0.25 < half < 0.65 and 0.5 < faint < 0.9
    # Another style on the same figures is not this one (checks: measured 0.29) ...
    assert em.likeness(f(render(SCENES, "checks")), base, training) < 0.5
    # ... nor is the style 3 pixels off: redraw and picture are compared place by place, as a redraw keeps the
    # layout (measured -1.3; a picture of other scenes, -18).
    assert em.likeness(f(shifted(render(SCENES, "stripes"))), base, training) < 0
    # Pictures of several sizes (a bucketed set): each is compared with its own.
    def sizes(images):
        return [images[0], images[1].resize((48, 40))]

    styled, plain = f(sizes(render(SCENES[:2], "stripes"))), f(sizes(render(SCENES[:2])))
    assert em.likeness(styled, plain, styled) == pytest.approx(1.0) and em.likeness(plain, plain, styled) == 0
    # A base that already redraws the training pictures exactly leaves nothing to measure; NaN redraws measure nothing.
    assert em.likeness(training, training, training) is None
    assert em.likeness([[torch.full_like(f, float("nan")) for f in per] for per in training], base, training) is None


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
    # The likeness pictures show the style: the set's plain figures (captioned without the word) are left out.
    assert any("zebrastyle" not in c for c in style) and all("zebrastyle" in c for c in prompts.likeness)
    untagged = evaluation_prompts(["a"], [], ["a", "b", "c", "d"], lambda i: Image.new("RGB", (8, 8)), [], count=2)
    assert untagged.likeness == ["a", "c"]  # no trigger word anywhere: spread over every caption


def ev(step, likeness, leak, strength=0.1):
    return {"step": step, "likeness": likeness, "leak": leak, "strength": strength}


def test_recommendation_rule():
    # Likeness rises then flattens; the leak grows late: the earliest near-best checkpoint with a low leak.
    runs = [ev(100, 0.2, 0.01), ev(200, 0.82, 0.02), ev(300, 0.9, 0.03), ev(400, 0.88, 0.08), ev(500, 0.85, 0.09)]
    assert recommend(runs)["step"] == 200
    # Near the best, but leaking: skipped for a later one that does not.
    runs[1] = ev(200, 0.85, 0.07)
    assert recommend(runs)["step"] == 300
    # Every near-best checkpoint leaks: the earliest of them, and the reason says so.
    leaky = [ev(100, 0.5, 0.01, 0.1), ev(200, 0.9, 0.08, 0.1), ev(300, 0.9, 0.06, 0.1), ev(400, 0.88, 0.09, 0.1)]
    pick = recommend(leaky)
    assert pick["step"] == 200 and "every one of those leaks" in pick["reason"]
    assert recommend([ev(100, None, 0.0)]) is None and recommend([]) is None
    # a checkpoint whose likeness is not a number is passed over, not the end of the rule
    assert recommend([ev(100, float("nan"), 0.0), ev(200, 0.5, 0.01)])["step"] == 200
    # no trigger word, no leak prompts: likeness alone decides
    unmeasured = recommend([ev(100, 0.5, None), ev(200, 0.95, None), ev(300, 1.0, None)])
    assert unmeasured["step"] == 200 and "no leak was measured" in unmeasured["reason"]
