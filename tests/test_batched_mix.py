"""Per-picture LoRA mixes in one batched call (trainer/batched_mix.py) against the single-picture path: each picture
of a batch must be the picture Generator.generate renders alone with the same prompt, mix and seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from trainer.batched_mix import Picture, SampleMixes, render_latents, render_pictures
from trainer.generate import Generator, GenerationCancelled, LoraFamilyError, LoraSpec, encode_prompt


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def world(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"mix-{family}")
    base = tiny_models.save_diffusers(family, root / "base")
    loras = root / "Lora"
    for name, seed, rank, alpha in (("style", 1, 4, 2.0), ("char", 2, 8, 8.0)):
        pipe, encoders, cfg = tiny_models.lora_pipeline(family, rank=rank, alpha=alpha, seed=seed)
        # large enough up weights that each LoRA visibly changes the picture
        for model in [pipe.unet, *encoders]:
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data *= 6
        tiny_models.export_kohya(pipe, encoders, cfg, loras / f"{name}.safetensors", dtype=torch.float32,
                                 family=family)
    gen = Generator(lora_dirs=[loras])
    gen.load(base)
    return family, loras, gen


def deltas(gen, path):
    """A file's lora_formats.ModuleDeltas on the generator's base, as render_pictures reads them."""
    return gen.lora_deltas(Path(path).resolve())[1]


def single_latents(gen, picture: Picture, steps, cfg):
    """The single-picture path: the mix merged into the weights by Generator.set_loras, one prompt, one seed."""
    gen.set_loras(picture.loras)
    pipe = gen.pipe
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    embeds = encode_prompt(encoders, tokenizers, picture.prompt, picture.negative_prompt)
    with torch.no_grad():
        return pipe(**embeds, num_inference_steps=steps, guidance_scale=cfg, width=64, height=64,
                    generator=torch.Generator("cpu").manual_seed(picture.seed), output_type="latent").images


def mixes(loras):
    style, char = str(loras / "style.safetensors"), str(loras / "char.safetensors")
    return [
        Picture("a red circle", [LoraSpec(style, 1.0)], seed=1),
        Picture("a red circle", [LoraSpec(style, 0.5, -1.0), LoraSpec(char, 0.8)], seed=1),
        Picture("a blue square", [], "blurry", seed=2),  # no LoRA at all inside a batch that has them
        Picture("a blue square", [LoraSpec(char, -0.7, 1.3)], "blurry", seed=3),
        Picture("a green star", [LoraSpec(style, 0.0, 1.0), LoraSpec(char, 1.0, 0.0)], seed=1),
    ]


@pytest.mark.parametrize("cfg", [5.0, 1.0])  # with guidance the UNet batch is doubled ([uncond; cond]), without not
def test_each_picture_equals_the_picture_rendered_alone(world, cfg):
    family, loras, gen = world
    pictures = mixes(loras)
    files = {s.path: deltas(gen, s.path) for p in pictures for s in p.loras}
    alone = torch.cat([single_latents(gen, p, 3, cfg) for p in pictures])
    gen.set_loras([])
    together = render_latents(gen.pipe, pictures, files, 3, cfg, 64, 64)
    # float32 rounding differs between batch sizes: the base model alone, one picture at batch 1 against batch 5,
    # moves these latents (|x| up to ≈50 after 3 steps) by up to 2e-5 of their largest value
    tol = 5e-5 * alone.abs().max().item()
    torch.testing.assert_close(together, alone, atol=tol, rtol=0)
    # the mixes differ far beyond that tolerance: each picture's LoRAs are visible in it
    flat = alone.flatten(1)
    gaps = (flat[:, None] - flat[None]).abs().amax(-1) + torch.eye(len(pictures)) * 1e9
    print(f"tol {tol:.2e}, smallest gap between two pictures {gaps.min():.2e}")
    assert gaps.min() > 50 * tol


def test_batched_pictures_equal_generate_alone_through_the_generator(world):
    family, loras, gen = world
    pictures = mixes(loras)
    pictures[0] = Picture("a red circle <lora:char:0.4:0.9>", [LoraSpec(str(loras / "style.safetensors"), 1.0)],
                          seed=1)  # A1111 tags in a batched prompt too
    kw = dict(steps=3, cfg=5.0, sampler="euler_a")  # ancestral: per-step noise from each picture's own seed
    batched = render_pictures(gen, pictures, max_batch=2, **kw)  # three calls: 2 + 2 + 1
    for picture, image in zip(pictures, batched):
        ref = np.asarray(gen.generate(picture.prompt, picture.loras, picture.negative_prompt, seed=picture.seed, **kw),
                         dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - ref).max() <= 1  # uint8 rounding of equal floats


def test_full_delta_branches_equal_low_rank_ones(world):
    """LoHa/LoKr entries have no up/down: their branch is x @ ΔWᵀ per sample. Given the same ΔW it must give what
    the low-rank branch gives, and the sum of two mixes' branches what a hand-merged weight gives."""
    family, loras, gen = world
    if family != "sd1":
        pytest.skip("one family is enough for the hook arithmetic")
    unet = gen.pipe.unet
    gen.set_loras([])
    entries = [e for e in deltas(gen, loras / "style.safetensors") if e.part == "unet"]

    class Full:  # a LoHa-like entry: only its full delta is known
        def __init__(self, e):
            self.part, self.module, self.up = e.part, e.module, None
            self._delta = e.delta()

        def delta(self):
            return self._delta

    torch.manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([400, 400])
    weights = torch.tensor([[0.3], [-1.2]])
    outs = []
    for files in ([entries], [[Full(e) for e in entries]]):
        with SampleMixes({"unet": unet}, files) as m, torch.no_grad():
            m.set_weights("unet", weights)
            outs.append(unet(x, t, ctx).sample)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    modules = dict(unet.named_modules())
    saved = {e.module: modules[e.module].weight.detach().clone() for e in entries}
    try:
        for n, w in enumerate(weights[:, 0].tolist()):
            for e in entries:  # an independent reference: W' = W0 + w·ΔW, sample by sample
                weight = modules[e.module].weight
                weight.data = saved[e.module] + w * e.delta().reshape(weight.shape)
            with torch.no_grad():
                torch.testing.assert_close(outs[0][n:n + 1], unet(x[n:n + 1], t[:1], ctx[n:n + 1]).sample,
                                           atol=1e-5, rtol=1e-4)
    finally:
        for e in entries:
            modules[e.module].weight.data = saved[e.module]


def test_hooks_are_removed_and_a_foreign_family_is_refused(world, tmp_path):
    family, loras, gen = world
    if family != "sd1":
        pytest.skip("the sdxl world's files are of its own family")
    plain = np.asarray(gen.generate("a red circle", [], steps=2, seed=4))
    calls = []
    render_pictures(gen, mixes(loras)[:3], steps=2, max_batch=2,
                    progress=lambda step, total, latents: calls.append((step, total, latents.shape[0])))
    assert calls == [(2, 4, 2), (4, 4, 2), (1, 2, 1), (2, 2, 1)]  # picture-steps: the UI's bar counts 2 × 3
    with pytest.raises(GenerationCancelled):  # Cancel: the progress callback returns True
        render_pictures(gen, mixes(loras)[:2], steps=2, progress=lambda *_: True)
    assert np.array_equal(np.asarray(gen.generate("a red circle", [], steps=2, seed=4)), plain)  # hooks removed
    pipe, encoders, cfg = tiny_models.lora_pipeline("sdxl")
    xl = tiny_models.export_kohya(pipe, encoders, cfg, tmp_path / "xl.safetensors", family="sdxl")
    with pytest.raises(LoraFamilyError, match="xl.safetensors is a sdxl LoRA but the base model base is sd1"):
        render_pictures(gen, [Picture("a cat", [LoraSpec(str(xl))])], steps=1)


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr-factored"])
def test_lycoris_files_in_a_batch_equal_their_delta_merged_by_hand(world, tmp_path, kind):
    """LoCon (3×3 convolutions: the down branch takes the layer's kernel), LoHa and LoKr (full-delta branches): each
    picture equals the base model with w·ΔW added to its weights, ΔW computed in numpy by tests/lora_fixtures.py."""
    from lora_fixtures import write_lora

    family, loras, gen = world
    if family != "sd1":
        pytest.skip("one family is enough for the formats")
    gen.set_loras([])
    parts = {"unet": gen.pipe.unet, "text_encoder": gen.pipe.text_encoder}
    path = tmp_path / f"{kind}.safetensors"
    expected = write_lora(path, kind, parts, rank=4, alpha=2.0, seed=5,
                          metadata={"ss_base_model_version": "sd_v1"})
    pictures = [Picture("a red circle", [LoraSpec(str(path), w)], seed=2) for w in (0.7, -0.5)]
    together = render_latents(gen.pipe, pictures, {str(path): deltas(gen, path)}, 3, 5.0, 64, 64)
    modules = {p: dict(m.named_modules()) for p, m in parts.items()}
    saved = {key: modules[key[0]][key[1]].weight.detach().clone() for key in expected}
    try:
        for n, picture in enumerate(pictures):
            for (part, name), delta in expected.items():
                weight = modules[part][name].weight
                weight.data = saved[(part, name)] + picture.loras[0].unet_weight * torch.from_numpy(
                    np.asarray(delta, dtype=np.float32)).reshape(weight.shape)
            alone = single_latents(gen, Picture(picture.prompt, [], seed=picture.seed), 3, 5.0)
            tol = 5e-5 * alone.abs().max().item()
            torch.testing.assert_close(together[n:n + 1], alone, atol=tol, rtol=0)
    finally:
        for (part, name), weight in saved.items():
            modules[part][name].weight.data = weight
    assert (together[0] - together[1]).abs().max() > 100 * tol
