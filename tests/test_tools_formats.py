"""Tools on files of every format (tests/lora_fixtures.py writes them with the ΔW each must give, computed there in
numpy): `merge` of one file converts it to a plain kohya LoRA with the same deltas, which diffusers loads whole;
resize and bake read them too."""
from __future__ import annotations

import pytest
import torch

import lora_fixtures
import tiny_models
from trainer.lora_file import kohya_module_name, read_lora
from trainer.tools import RankRule, bake, merge, resize

KINDS = ["loha", "loha-tucker", "lokr-factored", "lokr-full", "locon-tucker", "locon", "diffusers", "peft"]


def file_deltas(path, sdxl=False) -> dict[str, torch.Tensor]:
    """kohya module name → (alpha / r) · up @ down of a plain kohya file, float64, [out, in·k·k]."""
    tensors, _ = read_lora(path)
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
            out[name] = float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down.double().flatten(1))
    return out


def kohya(part: str, module: str, sdxl: bool) -> str:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}[part]
    return kohya_module_name(prefix, module)


@pytest.fixture(scope="module")
def sd1():
    pipe = tiny_models.pipeline("sd1")
    return pipe, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_of_one_file_converts_it_exactly_to_a_plain_lora(sd1, kind, tmp_path):
    pipe, parts = sd1
    given = {"unet": parts["unet"]} if kind == "peft" else parts  # a PEFT file holds one model
    src = tmp_path / "src.safetensors"
    expected = lora_fixtures.write_lora(src, kind, given, rank=4, alpha=2.0, limit=24,
                                        metadata={"ss_base_model_version": "sd_v1"})
    out = merge([(src, 1.0)], tmp_path / "plain.safetensors").path
    got = file_deltas(out)
    assert set(got) == {kohya(p, m, False) for p, m in expected}
    for (part, module), delta in expected.items():
        want = torch.from_numpy(delta).reshape(delta.shape[0], -1)
        torch.testing.assert_close(got[kohya(part, module, False)], want, atol=1e-5, rtol=1e-4)
    keys = read_lora(out)[0]
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)


@pytest.mark.parametrize("kind", ["loha", "lokr-factored"])
def test_a_converted_lycoris_file_loads_whole_in_diffusers_and_acts_like_the_original(sd1, kind, tmp_path):
    """Every module (3×3 convolutions, conv_in/out and the time embedding included) becomes a LoRA layer, and the
    UNet's output equals the base's with the file's ΔW added by hand."""
    pipe, parts = sd1
    src = tmp_path / "src.safetensors"
    expected = lora_fixtures.write_lora(src, kind, parts, rank=2, alpha=1.0,
                                        metadata={"ss_base_model_version": "sd_v1"})
    out = merge([(src, 1.0)], tmp_path / "plain.safetensors").path
    fresh = tiny_models.pipeline("sd1")
    fresh.load_lora_weights(str(out), adapter_name="x")
    layers = sum(1 for m in (fresh.unet, fresh.text_encoder) for _, mod in m.named_modules()
                 if hasattr(mod, "lora_A") and "x" in mod.lora_A)
    assert layers == len(expected)
    by_hand = tiny_models.pipeline("sd1")
    models = {"unet": by_hand.unet, "text_encoder": by_hand.text_encoder}
    with torch.no_grad():
        for (part, module), delta in expected.items():
            w = models[part].get_submodule(module).weight
            w += torch.from_numpy(delta).reshape(w.shape).float()
        torch.manual_seed(0)
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
        torch.testing.assert_close(fresh.unet(x, torch.tensor([300]), ctx).sample,
                                   by_hand.unet(x, torch.tensor([300]), ctx).sample, atol=1e-4, rtol=1e-3)


def test_sdxl_ldm_names_come_out_as_diffusers_names_with_te1_te2(tmp_path):
    pipe = tiny_models.pipeline("sdxl")
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    src = tmp_path / "ldm.safetensors"
    expected = lora_fixtures.write_lora(src, "lora", parts, rank=4, alpha=2.0, sdxl_names="ldm", limit=40,
                                        metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert any("input_blocks" in k for k in read_lora(src)[0])
    out = resize(src, tmp_path / "r8.safetensors", RankRule(8)).path  # above the rank: the same deltas
    got = file_deltas(out)
    for (part, module), delta in expected.items():
        want = torch.from_numpy(delta).reshape(delta.shape[0], -1)
        torch.testing.assert_close(got[kohya(part, module, True)], want, atol=1e-5, rtol=1e-4)
    meta = read_lora(out)[1]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_bake_takes_a_loha_and_a_diffusers_file(sd1, tmp_path):
    pipe, parts = sd1
    folder = tiny_models.save_diffusers("sd1", tmp_path / "base")
    loha = lora_fixtures.write_lora(tmp_path / "loha.safetensors", "loha", parts, rank=2, alpha=1.0, limit=16)
    diff = lora_fixtures.write_lora(tmp_path / "d.safetensors", "diffusers", parts, rank=4, seed=3, limit=16)
    out = bake(folder, [(tmp_path / "loha.safetensors", 0.5), (tmp_path / "d.safetensors", (1.0, -1.0))],
               tmp_path / "baked").path
    from trainer.models import load_base_model
    baked, base = load_base_model(out), load_base_model(folder)
    models = {"unet": (baked.unet, base.unet), "text_encoder": (baked.text_encoders[0], base.text_encoders[0])}
    for (part, module) in set(loha) | set(diff):
        w = 1.0 if part == "unet" else -1.0
        want = 0.5 * loha.get((part, module), 0) + w * diff.get((part, module), 0)
        new, old = (m.get_submodule(module).weight.double() for m in models[part])
        torch.testing.assert_close(new - old, torch.as_tensor(want).reshape(new.shape), atol=1e-6, rtol=1e-4)
