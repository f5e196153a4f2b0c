"""Generation's progress callback, Cancel, and the live latent preview, on the committed demo model.

The preview is judged against the picture the VAE decodes from the same latents: a linear latent→RGB map must
give a small image that looks like the decoded one (colour correlation per pixel), far closer than a map fitted
on shuffled colours would be.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.generate import GenerationCancelled, Generator, decode_latents
from trainer.preview import fit_projection, latent_preview

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def gen():
    if not DEMO_MODEL.exists():
        pytest.skip("the demo model is not there")
    g = Generator()
    g.load(DEMO_MODEL)
    return g


def test_progress_is_called_once_per_step_and_the_picture_is_the_same(gen):
    calls = []
    image = gen.generate(PROMPT, seed=3, steps=6, cfg=5.0,
                         progress=lambda step, total, latents: calls.append((step, total, tuple(latents.shape))))
    assert [c[:2] for c in calls] == [(s, 6) for s in range(1, 7)]
    assert calls[0][2][1] == gen.pipe.unet.config.in_channels
    plain = gen.generate(PROMPT, seed=3, steps=6, cfg=5.0)  # the callback changes nothing in the result
    assert np.array_equal(np.asarray(image), np.asarray(plain))


def test_cancel_stops_at_the_step_it_was_asked(gen):
    seen = []

    def progress(step, total, latents):
        seen.append(step)
        return step == 2
    with pytest.raises(GenerationCancelled, match="step 2 of 8"):
        gen.generate(PROMPT, seed=3, steps=8, cfg=5.0, progress=progress)
    assert seen == [1, 2]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def test_latent_preview_looks_like_the_decoded_picture(gen):
    final = {}
    gen.generate("a blue square on a yellow background", seed=5, steps=10, cfg=5.0,
                 progress=lambda step, total, latents: final.update(latents=latents.clone()))
    latents = final["latents"]
    decoded = decode_latents(gen.pipe, latents)
    projection = fit_projection(gen.pipe.vae)
    preview = latent_preview(latents, projection, size=decoded.size)
    assert preview.size == decoded.size
    ours = np.asarray(preview, np.float64)
    truth = np.asarray(decoded, np.float64)
    good = _correlation(ours, truth)
    # a control: the same least squares on a scrambled channel order explains the picture much worse
    scrambled = latent_preview(latents, projection[[1, 2, 3, 0, 4]], size=decoded.size)
    assert good > 0.7, good
    control = _correlation(np.asarray(scrambled, np.float64), truth)
    assert good > control + 0.3, (good, control)
    error, control_error = (np.abs(x - truth).mean() for x in (ours, np.asarray(scrambled, np.float64)))
    assert error < 0.7 * control_error, (error, control_error)
