"""trainer.models: family detection and offline loading of diffusers folders and original-layout single files.

The references are independent of the loader: the tiny pipelines' own tensors (every one must come back equal),
the published parameter counts of the real models, diffusers' own single-file loader and model-type rule.
"""
from __future__ import annotations

import argparse
import os
import socket

import pytest
import torch
from safetensors.torch import save_file

import original_layout
import tiny_models
from trainer import models
from trainer.config import PROJECT_ROOT
from trainer.errors import ModelError
from trainer.families import FAMILIES, detect_family
from trainer.models import MODEL_CONFIGS_DIR, list_checkpoints, load_base_model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Prove that nothing is fetched: hub offline mode, and any attempt to open a connection fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (pipeline, diffusers folder, original-layout .safetensors) for sd1, sd2-v and sdxl."""
    out = {}
    for family in ("sd1", "sd2-v", "sdxl"):
        root = tmp_path_factory.mktemp(family)
        pipe = tiny_models.pipeline(family, seed=3)
        pipe.save_pretrained(str(root / "diffusers"))
        out[family] = (pipe, root / "diffusers", original_layout.write_original(pipe, root / "model.safetensors"))
    return out


def reference_parts(pipe) -> list:
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return [("unet", pipe.unet), ("vae", pipe.vae)] + [(f"text_encoder[{i}]", e) for i, e in enumerate(encoders)]


def assert_same_weights(pipe, base, dtype=torch.float32, vae_dtype=None):
    loaded = [base.unet, base.vae, *base.text_encoders]
    references = reference_parts(pipe)
    assert len(loaded) == len(references)
    for (name, ref), got in zip(references, loaded):
        want, have = ref.state_dict(), got.state_dict()
        assert set(have) == set(want), f"{name}: key sets differ: {sorted(set(have) ^ set(want))[:5]}"
        expected_dtype = vae_dtype if (name == "vae" and vae_dtype) else dtype
        for key, value in want.items():
            assert have[key].dtype == expected_dtype, f"{name}.{key}: {have[key].dtype}"
            assert torch.equal(have[key], value.to(expected_dtype)), f"{name}.{key} differs"
        assert not any(p.requires_grad for p in got.parameters()), f"{name} is not frozen"
        assert not got.training


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_diffusers_folder_round_trip(tiny, family):
    pipe, folder, _ = tiny[family]
    base = load_base_model(folder)
    assert base.family is FAMILIES[family]
    assert detect_family(folder) is FAMILIES[family]
    assert_same_weights(pipe, base)
    assert [t.pad_token for t in base.tokenizers] == [t.pad_token for t in
                                                      [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)] if t]
    assert base.noise_scheduler.config.prediction_type == FAMILIES[family].prediction_type


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_single_file_round_trip(tiny, family):
    pipe, folder, file = tiny[family]
    base = load_base_model(file, config_dir=folder)
    assert base.family is FAMILIES[family]
    assert base.path == file
    assert_same_weights(pipe, base)
    # Single files take the shipped tokenizer; OpenCLIP encoders pad with "!".
    pads = {"sd1": ["<|endoftext|>"], "sd2-v": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]
    assert [t.pad_token for t in base.tokenizers] == pads
    assert base.tokenizers[0]("a photo of a cat").input_ids == pipe.tokenizer("a photo of a cat").input_ids
    sched = base.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end, sched.beta_schedule) == \
        (1000, 0.00085, 0.012, "scaled_linear")
    assert sched.prediction_type == FAMILIES[family].prediction_type


def test_single_file_layout_matches_diffusers_reading(tiny):
    """The test helper's files are the layout diffusers itself reads: its model-type rule and its own loader."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    assert infer_diffusers_model_type(load_file(tiny["sd1"][2])) == "v1"
    assert infer_diffusers_model_type(load_file(tiny["sdxl"][2])) == "xl_base"
    pipe, folder, file = tiny["sd1"]
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    ours = load_base_model(file, config_dir=folder)
    for a, b in [(theirs.unet, ours.unet), (theirs.vae, ours.vae), (theirs.text_encoder, ours.text_encoders[0])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ckpt_loads_with_weights_only(tiny, tmp_path):
    pipe, folder, _ = tiny["sd1"]
    ckpt = tmp_path / "model.ckpt"
    # The Lightning form of real .ckpt files: weights under "state_dict" beside plain values.
    torch.save({"state_dict": original_layout.pipeline_to_original(pipe), "global_step": 470000, "epoch": 6}, ckpt)
    assert detect_family(ckpt) is FAMILIES["sd1"]
    assert_same_weights(pipe, load_base_model(ckpt, config_dir=folder))


def test_clip_keys_without_text_model_level(tiny, tmp_path):
    pipe, folder, _ = tiny["sd1"]
    prefix = "cond_stage_model.transformer."
    state = {k.replace(prefix + "text_model.", prefix): v for k, v in original_layout.pipeline_to_original(pipe).items()}
    save_file(state, tmp_path / "old.safetensors")
    assert_same_weights(pipe, load_base_model(tmp_path / "old.safetensors", config_dir=folder))


def test_ckpt_with_python_objects_is_refused(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": argparse.Namespace(lr=1)}, ckpt)
    with pytest.raises(ModelError) as err:
        load_base_model(ckpt)
    message = str(err.value)
    assert str(ckpt) in message and "argparse.Namespace" in message and ".safetensors" in message


def test_dtype_and_sdxl_vae_upcast(tiny):
    pipe, folder, file = tiny["sdxl"]
    base = load_base_model(file, config_dir=folder, dtype=torch.float16)
    assert_same_weights(pipe, base, dtype=torch.float16, vae_dtype=torch.float32)
    pipe, folder, file = tiny["sd1"]
    assert_same_weights(pipe, load_base_model(folder, dtype=torch.bfloat16), dtype=torch.bfloat16)
    # SD 1.x's VAE overflows in fp16 too: kept fp32 as stored, not rounded to fp16 on the way
    assert_same_weights(pipe, load_base_model(file, config_dir=folder, dtype=torch.float16), dtype=torch.float16,
                        vae_dtype=torch.float32)


def test_cast_while_reading_gives_diffusers_own_cast(tiny):
    """A folder stored in fp32 loaded in bf16/fp16 is read tensor by tensor (trainer/weights.py), not through
    from_pretrained: the result must be what diffusers' from_pretrained(torch_dtype=...) gives, tensor for tensor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for family, dtype in (("sd1", torch.bfloat16), ("sdxl", torch.float16)):
        _, folder, _ = tiny[family]
        ours = load_base_model(folder, dtype=dtype)
        vae_dtype = torch.float32 if family == "sdxl" else dtype  # SDXL's VAE stays fp32 under fp16
        for cls, sub, got, want_dtype in ((UNet2DConditionModel, "unet", ours.unet, dtype),
                                          (AutoencoderKL, "vae", ours.vae, vae_dtype)):
            theirs = cls.from_pretrained(folder, subfolder=sub, torch_dtype=want_dtype, local_files_only=True)
            assert type(got) is type(theirs) and got.config == theirs.config
            a, b = theirs.state_dict(), got.state_dict()
            assert set(a) == set(b), sub
            assert all(b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]) for k in a), f"{family} {sub}"


def test_sd2_prediction_type_rules(tiny, tmp_path):
    pipe, folder, file = tiny["sd2-v"]
    state = original_layout.pipeline_to_original(pipe)
    # Nothing says v: the weight statistic of a fresh model (zero norm biases) reads as the 512-base epsilon model.
    assert detect_family(file) is FAMILIES["sd2"]
    save_file(state, tmp_path / "meta.safetensors", metadata={"modelspec.prediction_type": "v"})
    assert detect_family(tmp_path / "meta.safetensors") is FAMILIES["sd2-v"]
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = dict(state, **{probe: torch.linspace(-0.5, 0.5, state[probe].numel())})
    save_file(spread, tmp_path / "stat.safetensors")
    assert detect_family(tmp_path / "stat.safetensors") is FAMILIES["sd2-v"]
    save_file(state, tmp_path / "yaml.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    (tmp_path / "yaml.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert detect_family(tmp_path / "yaml.safetensors") is FAMILIES["sd2-v"]  # the sidecar outranks metadata
    # An explicit family decides between sd2 and sd2-v, over config_dir's scheduler (v_prediction here).
    base = load_base_model(file, family="sd2", config_dir=folder)
    assert base.family is FAMILIES["sd2"] and base.noise_scheduler.config.prediction_type == "epsilon"


def test_explicit_family_of_another_architecture_is_an_error(tiny):
    _, folder, file = tiny["sd1"]
    for path in (folder, file):
        with pytest.raises(ModelError, match="model.family is 'sdxl' but the weights are sd1"):
            load_base_model(path, family="sdxl", config_dir=folder if path == file else None)
    with pytest.raises(ModelError, match="unknown model family 'sd3'"):
        load_base_model(file, family="sd3")


def test_shipped_configs_do_not_fit_tiny_weights(tiny):
    _, _, file = tiny["sd1"]
    with pytest.raises(ModelError, match="do not fit the sd1 configuration"):
        load_base_model(file)  # the full-size sd1 configs from trainer/model_configs


# Published parameter counts (../shared/model-families.md).
UNET = {"sd1": 859_520_964, "sd2": 865_910_724, "sd2-v": 865_910_724, "sdxl": 2_567_463_684}
TEXT = {"sd1": [123_060_480], "sd2": [340_387_840], "sd2-v": [340_387_840], "sdxl": [123_060_480, 694_659_840]}
VAE = 83_653_863


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shipped_configs_reproduce_published_parameter_counts(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = MODEL_CONFIGS_DIR / family
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        ["model_index.json", "config.json", "config.json", "config.json", "scheduler_config.json"]
        + (["config.json"] if family == "sdxl" else []))  # configs only: no weights, no tokenizer copies
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2")))
    assert count(unet) == UNET[family]
    assert count(vae) == VAE
    assert [count(e) for e in encoders] == TEXT[family]
    assert detect_family(root) is FAMILIES[family]  # the configs carry the switches the folder rule reads
    fam = FAMILIES[family]
    assert unet.config.sample_size * 8 == fam.resolution
    assert vae.config.scaling_factor == (0.13025 if fam.is_sdxl else 0.18215)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match="not found") as err:
        load_base_model(missing)
    assert str(missing) in str(err.value)


def test_random_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a diffusers model folder: expected model_index.json"):
        detect_family(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"holds 1 checkpoint file\(s\) \(a.safetensors\)"):
        load_base_model(tmp_path)


def test_text_file_renamed_safetensors(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("these are not the weights you are looking for")
    for call in (detect_family, load_base_model):
        with pytest.raises(ModelError, match="not a valid .safetensors file") as err:
            call(fake)
        assert str(fake) in str(err.value)
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ModelError, match="not a checkpoint: expected a .safetensors or .ckpt"):
        load_base_model(other)


def test_unknown_family_single_file(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "text_tower.embed.weight": torch.zeros(4, 4)}, odd)
    with pytest.raises(ModelError) as err:
        load_base_model(odd)
    message = str(err.value)
    assert str(odd) in message and "unknown model family" in message
    assert "text_tower.embed" in message and "model.family" in message
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(ModelError, match="this is a LoRA, not a base model"):
        detect_family(lora)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, inpaint)
    with pytest.raises(ModelError, match="9 input channels"):
        detect_family(inpaint)


def test_list_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == []
    sd = tmp_path / "Stable-diffusion"
    for name in ["b.safetensors", "A.ckpt", "notes.txt", "sub/c.safetensors", "xl/model_index.json",
                 "xl/unet/diffusion_pytorch_model.safetensors", ".hidden/d.safetensors"]:
        (sd / name).parent.mkdir(parents=True, exist_ok=True)
        (sd / name).write_bytes(b"")
    assert list_checkpoints(tmp_path) == [sd / "A.ckpt", sd / "b.safetensors", sd / "sub/c.safetensors", sd / "xl"]


def test_identity_is_stable_and_follows_the_file(tiny, tmp_path):
    _, folder, file = tiny["sd1"]
    assert models._identity(file) == models._identity(file) and len(models._identity(file)) == 16
    assert models._identity(folder) != models._identity(file)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(file.read_bytes())
    before = models._identity(copy)
    os.utime(copy, ns=(0, 10**18))
    assert models._identity(copy) != before


def test_demo_model_default():
    assert models.default_base_model() == models.DEMO_MODEL_DIR == PROJECT_ROOT / "models" / "demo"
