"""Every format's ΔW equals the format's definition, computed independently (tests/lora_fixtures.py), on the demo
model and the tiny SD 1.x / SDXL models; and where diffusers or PEFT load the format, equals what they load."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lora_fixtures
import tiny_models
from trainer.lora_file import LoraFileError
from trainer.lora_formats import LoraFormatError, module_deltas, read_lora


def _parts(pipe) -> dict:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


@pytest.fixture(scope="module")
def models():
    from trainer.models import load_base_model

    demo = load_base_model("models/demo")
    return {"demo": {"unet": demo.unet, "text_encoder": demo.text_encoders[0]},
            "sd1": _parts(tiny_models.pipeline("sd1")), "sdxl": _parts(tiny_models.pipeline("sdxl")),
            "sd2": _parts(tiny_models.pipeline("sd2-v"))}


def assert_deltas(path, parts, expected):
    lora = read_lora(path)
    deltas = module_deltas(lora, parts)
    got = {(d.part, d.module): d for d in deltas}
    assert set(got) == set(expected)
    for key, want in expected.items():
        d = got[key]
        delta = d.delta()
        assert delta.dtype == torch.float32 and delta.shape == dict(parts[key[0]].named_modules())[key[1]].weight.shape
        np.testing.assert_allclose(delta.double().numpy(), want, rtol=1e-5, atol=1e-7)
        if d.up is not None:  # the plain low-rank view agrees with the full delta
            torch.testing.assert_close(d.scale * (d.up.flatten(1) @ d.down.flatten(1)).reshape(delta.shape), delta)
    return lora


# (kind, expected format, algorithm, alpha in the file)
KOHYA_KINDS = [
    ("lora", "kohya-lora", "lora", 2.0), ("lora", "kohya-lora", "lora", None),
    ("locon", "locon", "locon", 8.0), ("locon-tucker", "locon", "tucker", 2.0),
    ("loha", "loha", "loha", 2.0), ("loha", "loha", "loha", None), ("loha-tucker", "loha", "loha", 4.0),
    ("lokr-full", "lokr", "lokr", 2.0), ("lokr-factored", "lokr", "lokr", 2.0), ("lokr-factored", "lokr", "lokr", None),
    ("lokr-tucker", "lokr", "lokr", 2.0),
]


@pytest.mark.parametrize("model", ["demo", "sd1", "sdxl"])
@pytest.mark.parametrize("kind,fmt,algorithm,alpha", KOHYA_KINDS)
def test_kohya_and_lycoris_deltas_follow_the_definitions(tmp_path, models, model, kind, fmt, algorithm, alpha):
    parts = models[model]
    path = tmp_path / f"{kind}.safetensors"
    expected = lora_fixtures.write_lora(path, kind, parts, rank=4, alpha=alpha, sdxl_names="diffusers" if model == "sdxl" else "",
                                        limit=60 if model == "sdxl" else 0)
    lora = assert_deltas(path, parts, expected)
    assert (lora.format, lora.algorithm) == (fmt, algorithm)
    assert lora.tucker == kind.endswith("tucker")
    assert lora.family == ("sdxl" if model == "sdxl" else "sd1")
    if kind != "lokr-full":
        assert lora.rank == 4
    assert lora.alpha == alpha


def test_tucker_locon_is_its_three_convolutions_in_a_row(tmp_path, models):
    """LyCORIS runs a Tucker LoCon as down (1×1), mid (k×k), up (1×1): the merged ΔW must give the same output."""
    import torch.nn.functional as F

    path = tmp_path / "tucker.safetensors"
    lora_fixtures.write_lora(path, "locon-tucker", models["sd1"], alpha=2.0)
    lora = read_lora(path)
    convs = [d for d in module_deltas(lora, models["sd1"]) if "mid" in d.entry.tensors]
    assert convs and all(d.up is None and d.scale is None for d in convs)
    for d in convs:
        t = d.entry.tensors
        x = torch.randn(1, d.weight_shape[1], 8, 8)
        chain = F.conv2d(F.conv2d(F.conv2d(x, t["down"]), t["mid"], padding=1), t["up"]) * (2.0 / 4)
        torch.testing.assert_close(F.conv2d(x, d.delta(), padding=1), chain, atol=1e-6, rtol=1e-4)


def test_sdxl_ldm_names_and_dtypes(tmp_path, models):
    """kohya's SDXL files name the UNet the LDM way (input_blocks_4_1_…); fp16 and bf16 tensors read as written."""
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / "ldm.safetensors"
        expected = lora_fixtures.write_lora(path, "lora", models["sdxl"], sdxl_names="ldm", dtype=dtype, limit=0)
        lora = read_lora(path)
        assert lora.family == "sdxl" and lora.dtype == str(dtype).removeprefix("torch.")
        assert lora.modules_per_part() == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
        # the reference rounds its factors to the file's dtype too
        deltas = {(d.part, d.module): d.delta() for d in module_deltas(lora, models["sdxl"])}
        assert set(deltas) == set(expected)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        worst = max(np.abs(deltas[k].double().numpy() - v).max() / (np.abs(v).max() + 1e-12) for k, v in expected.items())
        assert worst < tol


def test_ldm_names_cover_every_unet_module(models):
    """Our LDM names are original_layout's (the single-file writer's) for every UNet module with weights."""
    from trainer.ldm_names import ldm_name

    for model in ("sd1", "sdxl", "demo"):
        unet = models[model]["unet"]
        mapping = lora_fixtures._ldm_map(unet)
        for name, m in unet.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                assert ldm_name(name, unet.config) + ".weight" == mapping[name + ".weight"]


DIFFUSERS_CONFIG = {"unet": {"r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {"to_k": 2}},
                    "text_encoder": {"r": 4, "lora_alpha": 16, "use_rslora": True}}


@pytest.mark.parametrize("model", ["demo", "sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["diffusers", "diffusers-lora-down", "diffusers-processor"])
def test_diffusers_layouts_with_and_without_adapter_metadata(tmp_path, models, model, kind):
    parts = models[model]
    for config in (None, DIFFUSERS_CONFIG):
        path = tmp_path / f"{kind}.safetensors"
        expected = lora_fixtures.write_lora(path, kind, parts, peft_config=config, limit=60 if model == "sdxl" else 0)
        lora = assert_deltas(path, parts, expected)
        assert lora.format == "diffusers" and lora.family == ("sdxl" if model == "sdxl" else "sd1")
        assert lora.alpha is None  # per-part alphas differ (or there are none)


@pytest.mark.parametrize("model", ["demo", "sdxl"])
@pytest.mark.parametrize("config", [None, {"r": 4, "lora_alpha": 8},
                                    {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"attn2.to_q": 1}}])
def test_peft_files_with_and_without_adapter_config(tmp_path, models, model, config):
    for part, kind in (("unet", "peft"), ("text_encoder", "peft-plain")):
        folder = tmp_path / part
        folder.mkdir(exist_ok=True)
        path = folder / "adapter_model.safetensors"
        expected = lora_fixtures.write_lora(path, kind, {part: models[model][part]}, peft_config=config)
        lora = assert_deltas(path, models[model], expected)
        assert lora.format == "peft"
        if config and not config.get("alpha_pattern"):
            assert lora.alpha == 8
        assert lora.family == ("sdxl" if model == "sdxl" and part == "unet" else "sd1")


def test_diffusers_own_loader_agrees(tmp_path):
    """diffusers' load_lora_weights + fuse_lora on the same files: kohya (SD 1.x names and SDXL LDM names),
    LoCon with 3×3 convs, no alpha, and a diffusers file whose header carries lora_adapter_metadata."""
    cases = [("sd1", "lora", "", None), ("sd1", "locon", "", 8.0), ("sdxl", "lora", "ldm", 2.0),
             ("sd1", "diffusers", "", None)]
    for family, kind, names, alpha in cases:
        pipe = tiny_models.pipeline(family)
        parts = _parts(pipe)
        before = {(p, n): m.weight.detach().clone() for p, model in parts.items()
                  for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        path = tmp_path / f"{family}-{kind}.safetensors"
        config = {"unet": {"r": 4, "lora_alpha": 8}, "text_encoder": {"r": 4, "lora_alpha": 2}} if kind == "diffusers" else None
        lora_fixtures.write_lora(path, kind, parts, alpha=alpha, sdxl_names=names, peft_config=config)
        ours = {(d.part, d.module): d.delta() for d in module_deltas(read_lora(path), parts)}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(components=list(parts), lora_scale=1.0)
        pipe.unload_lora_weights()
        for (p, n), w0 in before.items():
            now = dict(parts[p].named_modules())[n].weight.detach()
            theirs = now - w0
            torch.testing.assert_close(ours.get((p, n), torch.zeros_like(w0)), theirs, atol=2e-6, rtol=1e-4)


def test_peft_own_loader_agrees(tmp_path, models):
    """PEFT itself: inject an adapter from the same adapter_config.json, load the file's state, compare deltas."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    unet = tiny_models.pipeline("sd1").unet
    path = tmp_path / "adapter_model.safetensors"
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"to_v": 3.0}}
    lora_fixtures.write_lora(path, "peft", {"unet": unet}, peft_config=config)
    ours = {d.module: d.delta() for d in module_deltas(read_lora(path), {"unet": unet})}
    targets = sorted(ours)
    inject_adapter_in_model(LoraConfig(target_modules=targets, **config), unet)
    state = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unet, state)
    assert not result.unexpected_keys
    modules = dict(unet.named_modules())
    for name, delta in ours.items():
        torch.testing.assert_close(delta, modules[name].get_delta_weight("default").float(), atol=1e-6, rtol=1e-5)


def test_unsupported_and_foreign_files_give_one_line(tmp_path, models):
    w = torch.zeros(4, 4)
    cases = {
        "dora": ({"lora_unet_a.lora_down.weight": w, "lora_unet_a.lora_up.weight": w, "lora_unet_a.dora_scale": w}, "DoRA"),
        "oft": ({"lora_unet_a.oft_blocks": w, "lora_unet_a.alpha": torch.tensor(1.0)}, "an OFT file"),
        "boft": ({"lora_unet_a.boft_R": w}, "a BOFT file"),
        "ia3": ({"base_model.model.a.ia3_l.default": w}, "an IA3 file"),
        "glora": ({"lora_unet_a.a1.weight": w, "lora_unet_a.a2.weight": w, "lora_unet_a.b1.weight": w}, "a GLoRA file"),
        "full": ({"lora_unet_a.diff": w, "lora_unet_a.diff_b": w[0]}, "full-difference"),
        "ckpt": ({"model.diffusion_model.input_blocks.0.0.weight": w}, "a full Stable Diffusion checkpoint"),
        "ti": ({"emb_params": w}, "a textual-inversion embedding"),
        "other": ({"foo.bar": w}, "holds no LoRA weights we know"),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in tensors.items()}, str(path))
        with pytest.raises(LoraFormatError) as e:
            read_lora(path)
        message = str(e.value)
        assert words in message and f"{name}.safetensors" in message and "\n" not in message and len(message) < 300
    (tmp_path / "notes.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="notes.safetensors is not a readable safetensors file"):
        read_lora(tmp_path / "notes.safetensors")


def test_unmatched_and_misshaped_keys_name_the_file_and_the_key(tmp_path, models):
    path = tmp_path / "xl.safetensors"
    lora_fixtures.write_lora(path, "lora", models["sdxl"], sdxl_names="diffusers", limit=30)
    with pytest.raises(LoraFileError, match=r"xl.safetensors does not fit this model: lora_\S+ matches no module of "
                                            r"its second text encoder \(it has none\); the LoRA was made for another"):
        module_deltas(read_lora(path), models["sd1"])
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 3, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, str(bad))
    with pytest.raises(LoraFileError, match=r"bad.safetensors does not fit the base model tiny: lora_unet_conv_in."
                                            r"lora_down.weight is for a layer of 32×27 weights, its UNet's conv_in "
                                            r"is 32×4×3×3 \(another model size\)"):
        module_deltas(read_lora(bad), models["sd1"], "tiny")
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, str(half))
    with pytest.raises(LoraFormatError, match="half.safetensors: module lora_unet_conv_in has .* but no up"):
        read_lora(half)


def test_family_of_diffusers_and_peft_files_from_their_keys(tmp_path, models):
    cases = [("sd1", "diffusers"), ("sdxl", "diffusers"), ("sd2", "diffusers"), ("sd1", "lora"), ("sdxl", "lora"),
             ("sd2", "lora")]
    for family, kind in cases:
        path = tmp_path / f"{family}-{kind}.safetensors"
        expected = lora_fixtures.write_lora(path, kind, models[family], sdxl_names="diffusers" if family == "sdxl" else "",
                                            limit=60 if family == "sdxl" else 0)
        assert read_lora(path).family == family
        assert_deltas(path, models[family], expected)
    unet_only = tmp_path / "sd2-unet.safetensors"  # SD 2.x's proj_in/proj_out are Linear: 2-D factors
    lora_fixtures.write_lora(unet_only, "lora", {"unet": models["sd2"]["unet"]})
    assert read_lora(unet_only).family == "sd2"
    # a UNet-only PEFT file: SDXL by its topology alone
    path = tmp_path / "adapter_model.safetensors"
    lora_fixtures.write_lora(path, "peft", {"unet": models["sdxl"]["unet"]})
    assert read_lora(path).family == "sdxl"
    meta = tmp_path / "meta.safetensors"
    lora_fixtures.write_lora(meta, "loha", models["sd1"], metadata={"ss_base_model_version": "sd_v2"}, limit=4)
    assert read_lora(meta).family == "sd2"


def test_inspect_names_format_algorithm_rank_alpha_and_refuses_in_one_line(tmp_path, models, capsys):
    from trainer.cli import main

    path = tmp_path / "hada.safetensors"
    expected = lora_fixtures.write_lora(path, "loha-tucker", models["sd1"], rank=4, alpha=None)
    counts = {part: sum(1 for p, _ in expected if p == part) for part in ("unet", "text_encoder")}
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: loha  algorithm: loha (tucker)" in out and "family: sd1" in out
    assert "rank: 4  alpha: none (scale 1)" in out
    assert f"modules: {{'te': {counts['text_encoder']}, 'unet': {counts['unet']}}}" in out
    oft = tmp_path / "oft.safetensors"
    save_file({"lora_unet_a.oft_blocks": torch.zeros(2, 2, 2)}, str(oft))
    assert main(["inspect", str(oft)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("error: oft.safetensors is an OFT file")
