"""Generation with stacked LoRAs, checked against weights merged by hand: W' = W0 + Σ w·(alpha/r)·up@down."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from trainer.generate import Generator, LoraFamilyError, LoraSpec, parse_prompt_loras
from trainer.lora_file import LoraFileError, read_lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = tiny_models.save_diffusers("sd1", root / "base")
    loras = root / "Lora"
    for name, seed, rank, alpha in (("style", 1, 4, 2.0), ("char", 2, 8, 8.0)):
        pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=rank, alpha=alpha, seed=seed)
        tiny_models.export_kohya(pipe, encoders, cfg, loras / f"{name}.safetensors", dtype=torch.float32)
    pipe, encoders, cfg = tiny_models.lora_pipeline("sdxl")
    tiny_models.export_kohya(pipe, encoders, cfg, loras / "xl.safetensors", family="sdxl")
    gen = Generator(lora_dirs=[loras])
    gen.load(base)
    return root, base, loras, gen


def merged_unet(base, files_and_weights):
    """An independent reference: the kohya formula applied to the plain weights, no PEFT involved."""
    unet = tiny_models.pipeline("sd1").unet
    modules = dict(unet.named_modules())
    for path, weight in files_and_weights:
        tensors, _ = read_lora(path)
        for key in tensors:
            if not (key.startswith("lora_unet_") and key.endswith(".lora_down.weight")):
                continue
            name = key.split(".")[0]
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            target = next(m for n, m in modules.items() if "lora_unet_" + n.replace(".", "_") == name)
            delta = up.flatten(1) @ down.flatten(1)
            target.weight.data += weight * scale * delta.reshape(target.weight.shape)
    return unet


def unet_out(unet):
    torch.manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        return unet(x, torch.tensor([400]), ctx).sample


def test_parse_a1111_lora_syntax():
    prompt, found = parse_prompt_loras("a cat, <lora:style:0.8>, <lora:char:0.5:1.2> <lora:plain>")
    assert prompt == "a cat"
    assert found == [("style", 0.8, 0.8), ("char", 1.2, 0.5), ("plain", 1.0, 1.0)]


def test_stacked_loras_equal_hand_merged_weights(setup):
    root, base, loras, gen = setup
    mix = [(loras / "style.safetensors", 0.7), (loras / "char.safetensors", -0.4)]
    gen.set_loras([LoraSpec(str(p), w) for p, w in mix])
    ours = unet_out(gen.pipe.unet)
    reference = unet_out(merged_unet(base, mix))
    plain = unet_out(tiny_models.pipeline("sd1").unet)
    assert not torch.allclose(ours, plain, atol=1e-4)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_unet_and_text_encoder_weights_are_separate(setup):
    root, base, loras, gen = setup
    ids = torch.randint(0, 49406, (1, 77))
    plain = tiny_models.pipeline("sd1")
    gen.set_loras([LoraSpec(str(loras / "style.safetensors"), unet_weight=0.0, te_weight=1.0)])
    with torch.no_grad():
        torch.testing.assert_close(unet_out(gen.pipe.unet), unet_out(plain.unet), atol=1e-6, rtol=0)
        assert not torch.allclose(gen.pipe.text_encoder(ids).last_hidden_state,
                                  plain.text_encoder(ids).last_hidden_state, atol=1e-4)


def test_base_pipeline_is_loaded_once_across_mixes(setup):
    root, base, loras, gen = setup
    loads = gen.loads
    for weight in (0.2, 0.9):
        gen.generate("a red circle", [LoraSpec(str(loras / "style.safetensors"), weight)], steps=2, seed=1)
    gen.generate("a red circle <lora:char:0.5>", steps=2, seed=1)
    gen.load(base)
    assert gen.loads == loads


def test_weight_zero_and_no_lora_give_the_same_picture_and_sweep_grid(setup):
    root, base, loras, gen = setup
    plain = np.asarray(gen.generate("a red circle", [], steps=3, seed=5), dtype=np.int16)
    grid, images = gen.sweep("a red circle", LoraSpec(str(loras / "style.safetensors")), weights=(0.0, 1.0),
                             steps=3, seed=5)
    zero = np.asarray(gen.generate("a red circle", [LoraSpec(str(loras / "style.safetensors"), 0.0)], steps=3, seed=5))
    assert np.array_equal(zero, plain)
    # the sweep renders its pictures in one batch (trainer/batched_mix.py): equal floats up to uint8 rounding
    assert np.abs(np.asarray(images[0], dtype=np.int16) - plain).max() <= 1
    assert np.abs(np.asarray(images[1], dtype=np.int16) - plain).mean() > 1.0
    assert grid.size == (2 * images[0].width, images[0].height + 20)


def test_a_lora_of_another_family_is_refused_with_both_named(setup):
    root, base, loras, gen = setup
    with pytest.raises(LoraFamilyError, match=r"xl.safetensors is a sdxl LoRA but the base model base is sd1"):
        gen.set_loras([LoraSpec(str(loras / "xl.safetensors"))])


def test_unknown_prompt_lora_names_the_folders(setup):
    root, base, loras, gen = setup
    with pytest.raises(LoraFileError, match=f"<lora:missing:…> names no file; looked for missing.safetensors in {loras}"):
        gen.generate("a cat <lora:missing:1>", steps=1)


def test_a_half_precision_unet_decodes_through_the_fp32_vae_in_fp32():
    """On CUDA the UNet and text encoders run in fp16 and the VAE stays fp32 (the SD VAEs overflow in fp16); the
    SDXL pipeline casts latents to the VAE only when the VAE is fp16, so it handed fp16 latents to the fp32 VAE (a
    dtype error), and the trainer's samples under autocast decoded in fp16. Here on the CPU: the VAE's decoder sees
    fp32 in both cases, and the picture matches the all-fp32 one."""
    from trainer.generate import encode_prompt, make_pipeline, render_embeds

    parts = tiny_models.pipeline("sdxl")
    encoders, tokenizers = [parts.text_encoder, parts.text_encoder_2], [parts.tokenizer, parts.tokenizer_2]
    pipe = make_pipeline(parts.unet, parts.vae, encoders, tokenizers, parts.scheduler, "euler")  # as Generator
    embeds = encode_prompt(encoders, tokenizers, "a red circle")
    reference = np.asarray(render_embeds(pipe, embeds, seed=3, steps=4, width=64, height=64), dtype=np.float32)
    # all in fp32 our decoding is diffusers' own, also for a VAE that publishes per-channel latent statistics
    for stats in ({}, {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.9, 1.1, 1.0, 0.8]}):
        pipe.vae.register_to_config(**stats)
        theirs = pipe(**embeds, num_inference_steps=4, guidance_scale=7.0, width=64, height=64,
                      generator=torch.Generator("cpu").manual_seed(3)).images[0]
        ours = render_embeds(pipe, embeds, seed=3, steps=4, width=64, height=64)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    pipe.vae.register_to_config(latents_mean=None, latents_std=None)
    seen = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    for model in (pipe.unet, *encoders):  # as Generator.load on CUDA; the VAE stays fp32
        model.half()
    half = np.asarray(render_embeds(pipe, embeds, seed=3, steps=4, width=64, height=64), dtype=np.float32)
    with torch.autocast("cpu", dtype=torch.float16):  # the trainer's samples in fp16 training
        render_embeds(pipe, embeds, seed=3, steps=4, width=64, height=64)
    assert seen == [torch.float32, torch.float32]
    assert np.abs(half - reference).mean() < 2.0  # 0-255 scale: fp16 UNet noise only
