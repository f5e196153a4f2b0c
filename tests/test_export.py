"""The kohya export, checked against the format rules (formats.md) and against diffusers' own loader."""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny_models
from tiny_models import export_kohya as export
from tiny_models import lora_pipeline as trained_pipeline
from trainer.export_run import export_lora
from trainer.lora_file import inspect_lora, read_lora, save_lora, text_encoder_prefixes
from trainer.metadata import RunInfo
from trainer.network import lora_state

KEY_RULE = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
EXPECTED = {"sd1": {"unet": 192, "te": 72}, "sdxl": {"unet": 722, "te1": 72, "te2": 192}}
TE_PROJ = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def exported(request, tmp_path_factory):
    family = request.param
    pipe, encoders, cfg = trained_pipeline(family)
    path = export(pipe, encoders, cfg, tmp_path_factory.mktemp(family) / f"my-{family}.safetensors", family=family)
    return family, pipe, encoders, cfg, path


def test_every_key_follows_the_kohya_rules(exported):
    family, _, encoders, _, path = exported
    tensors, _ = read_lora(path)
    counts: dict[str, int] = {}
    for key, t in tensors.items():
        assert KEY_RULE.match(key), key
        module, leaf = key.split(".", 1)
        if leaf == "alpha":
            assert t.dim() == 0 and t.dtype == torch.float32 and float(t) == 2.0
        else:
            assert t.dtype == torch.float16
        if leaf == "lora_down.weight":
            part = module.split("_")[1]
            counts[part] = counts.get(part, 0) + 1
    assert counts == EXPECTED[family]
    # Text-encoder names: the long form A1111 and ComfyUI match, built here from the layer count alone.
    for prefix, te in zip(text_encoder_prefixes(len(encoders)), encoders):
        layers = te.config.num_hidden_layers
        want = {f"{prefix}text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in TE_PROJ}
        got = {k.split(".")[0] for k in tensors if k.startswith(prefix)}
        assert got == want


def test_unet_names_are_diffusers_module_paths(exported):
    family, _, _, _, path = exported
    fresh = tiny_models.pipeline(family).unet
    linear_paths = {n.replace(".", "_") for n, m in fresh.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    tensors, _ = read_lora(path)
    names = {k.split(".")[0][len("lora_unet_"):] for k in tensors if k.startswith("lora_unet_")}
    assert names <= linear_paths


def test_metadata(exported):
    family, _, _, _, path = exported
    tensors, meta = read_lora(path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_output_name"] == path.stem
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_shapes": {"red": 2}}
    assert "lora_adapter_metadata" not in meta
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_diffusers_loader_consumes_every_key_and_reproduces_our_model(exported, tmp_path):
    family, pipe, encoders, cfg, _ = exported
    path = export(pipe, encoders, cfg, tmp_path / "fp32.safetensors", dtype=torch.float32, family=family)
    fresh = tiny_models.pipeline(family)  # same seed: the same base weights
    fresh.load_lora_weights(str(path), adapter_name="ours")
    tensors, _ = read_lora(path)
    # Every module in the file became a LoRA layer with our weights and scaling alpha / r.
    n_layers = 0
    for part, model in [("unet", fresh.unet), ("te", fresh.text_encoder)] + (
            [("te2", fresh.text_encoder_2)] if family == "sdxl" else []):
        prefix = {"unet": "lora_unet_", "te": text_encoder_prefixes(len(encoders))[0]}.get(part, "lora_te2_")
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "ours" in module.lora_A:
                n_layers += 1
                kohya = prefix + (name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name).replace(".", "_")
                assert torch.equal(module.lora_A["ours"].weight.reshape(-1), tensors[f"{kohya}.lora_down.weight"].reshape(-1))
                assert module.scaling["ours"] == pytest.approx(2.0 / 4)
    assert n_layers == sum(EXPECTED[family].values())
    # The loaded pipeline's UNet gives the same output as our in-memory trained UNet.
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        ours = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        theirs = fresh.unet(x, t, ctx, added_cond_kwargs=added).sample
        base = tiny_models.pipeline(family).unet(x, t, ctx, added_cond_kwargs=added).sample
    assert not torch.allclose(ours, base, atol=1e-4)  # the LoRA changes the output…
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)  # …and the file reproduces it
    # And the text encoder.
    ids = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_encoder(ids).last_hidden_state, encoders[0](ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conv_rank", [0, 2])
def test_diffusers_format_export_is_labelled_and_loads_at_its_alpha(tmp_path, conv_rank):
    """alpha 2 at rank 4 (and LoCon's 3x3 convolutions at rank 2, alpha 1): diffusers' loader gives the UNet and
    text encoder we trained, not one scaled as if alpha were the rank."""
    pipe, encoders, cfg = trained_pipeline("sd1", conv_rank=conv_rank)
    cfg.output.format, cfg.output.save_precision = "diffusers", "fp32"
    parts = {"unet": lora_state(pipe.unet), "text_encoder": lora_state(encoders[0])}
    info = RunInfo("sd_v1", "stable-diffusion-v1/lora", "epsilon", "tiny", 10, 1, 3, 0.0, "no", "AdamW")
    path = export_lora(cfg, parts, tmp_path / "d.safetensors", info, is_sdxl=False)
    info = inspect_lora(path)
    assert info["format"] == "diffusers" and info["family"] == "sd1"
    fresh = tiny_models.pipeline("sd1")
    fresh.load_lora_weights(str(path), adapter_name="d")
    n = sum(1 for _, m in fresh.unet.named_modules() if hasattr(m, "lora_A") and "d" in m.lora_A)
    downs = [t for state in parts.values() for k, t in state.items() if k.endswith("lora_A.weight")]
    assert n == sum(k.endswith("lora_A.weight") for k in parts["unet"]) >= 192
    # LoRA Studio's own reader takes the alphas from the header too: 1 for the 3x3 convolutions, 2 for the rest
    n_3x3 = sum(t.dim() == 4 and t.shape[-1] == 3 for t in downs)
    assert info["alphas"] == {"2.0": len(downs) - n_3x3, **({"1.0": n_3x3} if n_3x3 else {})}
    assert (n_3x3 > 0) == (conv_rank > 0)
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    ids = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        ours, theirs = pipe.unet(x, t, ctx).sample, fresh.unet(x, t, ctx).sample
        assert not torch.allclose(ours, tiny_models.pipeline("sd1").unet(x, t, ctx).sample, atol=1e-4)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fresh.text_encoder(ids).last_hidden_state, encoders[0](ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


def test_inspect_reports_family_rank_alpha_counts(exported):
    family, _, _, _, path = exported
    info = inspect_lora(path)
    assert info["format"] == "kohya-lora" and info["algorithm"] == "lora" and info["family"] == family
    assert info["rank"] == 4 and info["alpha"] == 2.0
    assert info["modules"] == EXPECTED[family]


def test_family_from_keys_without_metadata(exported, tmp_path):
    family, _, _, _, path = exported
    tensors, _ = read_lora(path)
    bare = save_lora(tmp_path / "bare.safetensors", tensors, {})
    assert inspect_lora(bare)["family"] == family


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    path = save_lora(tmp_path / "x.safetensors", {"a.alpha": torch.tensor(1.0)}, {"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["k"] == "v"


def test_trigger_words_are_the_tags_most_captions_share():
    """The Gallery's trigger words when a file names no trigger phrase: the demo style set's captions each describe
    their own picture and all end in `zebrastyle`; only that is a trigger word."""
    from trainer.config import DataConfig
    from trainer.data import load_dataset
    from trainer.lora_file import trigger_words

    root = Path(__file__).resolve().parent.parent
    ds = load_dataset(DataConfig(dataset=str(root / "datasets" / "demo-style"), resolution=64), 0)
    meta = {"ss_tag_frequency": json.dumps(ds.tag_frequency), "ss_dataset_dirs": json.dumps(ds.dataset_dirs)}
    assert trigger_words(meta) == ["zebrastyle"]
    # a file from elsewhere without image counts: the commonest tag's count stands in for them
    tags = {"1girl": 20, "sks": 20, "solo": 15, "smile": 6, "hat": 2}
    assert trigger_words({"ss_tag_frequency": json.dumps({"10_sks": tags})}) == ["1girl", "sks", "solo"]
    assert trigger_words({**meta, "modelspec.trigger_phrase": "zebra style"}) == ["zebra style"]


def test_a_set_described_in_sentences_gives_its_coined_subject_word():
    """The demo character's captions are sentences ("a red zorbo on a white background"), no trigger word: the
    Gallery must still tell the user to type `zorbo`, the one word of them CLIP does not know."""
    from trainer.config import DataConfig
    from trainer.data import load_dataset
    from trainer.lora_file import trigger_words

    root = Path(__file__).resolve().parent.parent
    ds = load_dataset(DataConfig(dataset=str(root / "datasets" / "demo-character"), resolution=64), 0)
    captions = [r.caption for r in ds.images]
    assert all("zorbo" in c for c in captions) and len(set(captions)) == len(captions)  # the premise
    meta = {"ss_tag_frequency": json.dumps(ds.tag_frequency), "ss_dataset_dirs": json.dumps(ds.dataset_dirs)}
    assert trigger_words(meta) == ["zorbo"]
    # a coined word in under half of the captions is one picture's detail, not the subject
    few = {"a red blorp on white": 1, "a blue cat on gray": 1, "a green cat on black": 1}
    assert trigger_words({"ss_tag_frequency": json.dumps({"set": few}),
                          "ss_dataset_dirs": json.dumps({"set": {"img_count": 3}})}) == []


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_locon_export_loads_whole_in_diffusers_and_reproduces_our_model(family, tmp_path):
    """network.conv_rank (kohya's conv_dim): ResNet blocks and down/upsamplers are adapted too, the 3x3 convolutions
    at their own rank and alpha; diffusers' loader takes every key and gives our UNet's output."""
    pipe, encoders, cfg = trained_pipeline(family, conv_rank=2, conv_alpha=1.0)
    path = export(pipe, encoders, cfg, tmp_path / "locon.safetensors", dtype=torch.float32, family=family)
    tensors, meta = read_lora(path)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    fresh_unet = tiny_models.pipeline(family).unet
    # kohya's LoCon modules, found by class name: every 3x3 conv of a ResNet block or a down/upsampler.
    conv_blocks = [n for n, m in fresh_unet.named_modules()
                   if type(m).__name__ in ("ResnetBlock2D", "Downsample2D", "Upsample2D")]
    want_3x3 = {f"lora_unet_{b}.{c}".replace(".", "_") for b in conv_blocks
                for c, m in fresh_unet.get_submodule(b).named_modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    got_3x3 = {k.split(".")[0] for k, t in tensors.items() if k.endswith("lora_down.weight") and t.dim() == 4
               and t.shape[-1] == 3}
    assert got_3x3 == want_3x3 and want_3x3
    for name in got_3x3:
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 2 and float(tensors[f"{name}.alpha"]) == 1.0
    others = {k.split(".")[0] for k in tensors if k.endswith(".alpha")} - got_3x3
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 and tensors[f"{n}.lora_down.weight"].shape[0] == 4 for n in others)
    # time_emb_proj (Linear) and conv_shortcut (1x1) of the ResNet blocks come at the main rank, as kohya's do.
    assert any(n.endswith("time_emb_proj") for n in others)

    fresh = tiny_models.pipeline(family)
    fresh.load_lora_weights(str(path), adapter_name="ours")
    loaded = sum(1 for part in [fresh.unet, fresh.text_encoder] + ([fresh.text_encoder_2] if family == "sdxl" else [])
                 for _, m in part.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A)
    assert loaded == len(others) + len(got_3x3)  # every module of the file became a LoRA layer
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    added = ({"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
             if family == "sdxl" else None)
    with torch.no_grad():
        ours = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        theirs = fresh.unet(x, t, ctx, added_cond_kwargs=added).sample
        base = tiny_models.pipeline(family).unet(x, t, ctx, added_cond_kwargs=added).sample
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
