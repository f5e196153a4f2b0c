"""bake and extract on tiny SD 1.x and SDXL models. The expected weights are computed here, independently: the LoRA's
ΔW added to the diffusers modules by hand, then written in the original layout by tests/original_layout.py;
generation with the baked model is compared with generation with the base plus the LoRA through diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import original_layout
import tiny_models
from trainer.errors import StudioError
from trainer.generate import Generator, LoraSpec
from trainer.lora_file import read_lora
from trainer.models import load_base_model
from trainer.tools import ToolError, bake, extract

PROMPT = "a red circle"


def add_lora_by_hand(pipe, path, weight: float) -> None:
    """W += weight · (alpha / r) · up @ down for every module of a kohya file, found by its name in the model."""
    tensors, _ = read_lora(path)
    models = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder, "lora_te1_": pipe.text_encoder,
              "lora_te2_": getattr(pipe, "text_encoder_2", None)}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        prefix = next(p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if name.startswith(p))
        model = models[prefix]
        flat = name[len(prefix):].removeprefix("text_model_")
        module = next(m for n, m in model.named_modules() if n.removeprefix("text_model.").replace(".", "_") == flat)
        down, up = tensors[key].double(), tensors[f"{name}.lora_up.weight"].double()
        delta = float(tensors[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        with torch.no_grad():
            module.weight += (weight * delta).reshape(module.weight.shape).to(module.weight.dtype)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def world(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"bake-{family}")
    folder = tiny_models.save_diffusers(family, root / "base")
    single = original_layout.write_original(tiny_models.pipeline(family), root / "base.safetensors",
                                            metadata={"note": "kept"})
    pipe, encoders, cfg = tiny_models.lora_pipeline(family, rank=4, alpha=2.0, seed=5)
    lora = tiny_models.export_kohya(pipe, encoders, cfg, root / "style.safetensors", dtype=torch.float32,
                                    family=family)
    return family, root, folder, single, lora


def test_single_file_bake_keeps_the_layout_and_patches_exactly_base_plus_delta(world):
    family, root, folder, single, lora = world
    out = bake(single, [(lora, 0.8)], root / "baked.safetensors", config_dir=folder).path
    expected_pipe = tiny_models.pipeline(family)
    add_lora_by_hand(expected_pipe, lora, 0.8)
    expected = original_layout.pipeline_to_original(expected_pipe)
    with safe_open(str(single), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(out), "pt") as f:
        baked = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["note"] == "kept"
    assert {k: (v.shape, v.dtype) for k, v in baked.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}
    changed = {k for k in base if not torch.equal(base[k], baked[k])}
    # exactly the LoRA's modules: UNet attention weights and the text encoders' (OpenCLIP's q/k/v in in_proj)
    assert changed == {k for k in base if not torch.equal(base[k], expected[k])}
    assert any("in_proj_weight" in k for k in changed) == (family == "sdxl")
    for k in changed:
        torch.testing.assert_close(baked[k], expected[k], atol=1e-6, rtol=1e-5)
    # diffusers' own single-file reader (A1111's and ComfyUI's layout) finds base + ΔW in every module
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    theirs = cls.from_single_file(str(out), config=str(folder), local_files_only=True)
    # (not SDXL's OpenCLIP-G: diffusers tells the two encoders apart by width, which a tiny model cannot show;
    # the exact comparison above covers its in_proj slices)
    for part in ["unet", "text_encoder"]:
        want = getattr(expected_pipe, part).state_dict()
        got = getattr(theirs, part).state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{part} {k}: {m}")
    assert load_base_model(out, config_dir=folder).family.name == family  # and ours


def test_folder_bake_generates_the_picture_of_base_plus_lora(world):
    family, root, folder, _, lora = world
    out = bake(folder, [(lora, 0.8)], root / "baked-folder").path
    assert (out / "model_index.json").is_file() and not list(root.glob(".baked-folder*"))
    gen = Generator()
    gen.load(folder)
    with_lora = np.asarray(gen.generate(PROMPT, [LoraSpec(str(lora), 0.8)], steps=3, seed=4), dtype=np.int16)
    plain = np.asarray(gen.generate(PROMPT, [], steps=3, seed=4), dtype=np.int16)
    gen.load(out)
    baked = np.asarray(gen.generate(PROMPT, [], steps=3, seed=4), dtype=np.int16)
    assert np.abs(with_lora - plain).max() > 10  # the LoRA shows…
    assert np.abs(baked - with_lora).max() <= 1  # …and the baked model draws the same picture without it


def test_fp16_single_file_stays_fp16_rounded_once(tmp_path):
    folder = tiny_models.save_diffusers("sd1", tmp_path / "configs")
    pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=4, alpha=2.0, seed=5)
    lora = tiny_models.export_kohya(pipe, encoders, cfg, tmp_path / "style.safetensors", dtype=torch.float32)
    state = {k: v.half() for k, v in original_layout.pipeline_to_original(tiny_models.pipeline("sd1")).items()}
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "half.safetensors"))
    out = bake(tmp_path / "half.safetensors", [(lora, 1.0)], tmp_path / "half-baked.safetensors",
               config_dir=folder).path
    exact = tiny_models.pipeline("sd1")
    for p in list(exact.unet.parameters()) + list(exact.text_encoder.parameters()):
        p.data = p.data.half().float()  # the fp16 base, in float32
    add_lora_by_hand(exact, lora, 1.0)
    expected = {k: v.half() for k, v in original_layout.pipeline_to_original(exact).items()}
    same = total = 0
    with safe_open(str(out), "pt") as f:
        for k in f.keys():
            got = f.get_tensor(k)
            assert got.dtype == torch.float16
            # one rounding of the exact sum: at most one fp16 step away, and nearly always the nearest value (the
            # float64 sum here and the float32 one there differ in the last float32 bit now and then)
            torch.testing.assert_close(got.float(), expected[k].float(), atol=1e-7, rtol=2**-10)
            same += int((got == expected[k]).sum())
            total += got.numel()
    assert same / total > 0.9999


def test_bake_refusals(world, tmp_path):
    family, root, folder, single, lora = world
    with pytest.raises(ToolError, match="single .safetensors base"):
        bake(folder, [(lora, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(ToolError, match="also an input"):
        bake(single, [(lora, 1.0)], lora, overwrite=True, config_dir=folder)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ToolError, match="already exists"):
        bake(folder, [(lora, 1.0)], tmp_path / "taken")
    other = "sdxl" if family == "sd1" else "sd1"
    pipe, encoders, cfg = tiny_models.lora_pipeline(other)
    wrong = tiny_models.export_kohya(pipe, encoders, cfg, tmp_path / "wrong.safetensors", family=other)
    with pytest.raises(StudioError, match=f"is a {other} LoRA but the base model"):
        bake(single, [(wrong, 1.0)], tmp_path / "y.safetensors", config_dir=folder)
    assert not list(tmp_path.glob("y*")) and not list(tmp_path.glob(".y*"))


def low_rank_change(model, names, rank: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    changes = {}
    for name in names:
        w = model.get_submodule(name).weight
        flat = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w[0].numel(), generator=gen) * 0.02
        changes[name] = flat.reshape(w.shape)
        with torch.no_grad():
            w += changes[name]
    return changes


def test_extract_recovers_a_known_low_rank_change(world):
    from trainer.lora_file import kohya_module_name
    from trainer.network import text_target_names, unet_target_names

    family, root, folder, _, _ = world
    tuned = tiny_models.pipeline(family)
    unet_changes = low_rank_change(tuned.unet, unet_target_names(tuned.unet), 3, 1)
    te_changes = low_rank_change(tuned.text_encoder, text_target_names(tuned.text_encoder), 2, 2)
    tuned.save_pretrained(str(root / "tuned"))  # text_encoder_2 (SDXL) unchanged: left out
    result = extract(folder, root / "tuned", root / "extracted.safetensors", rank=4, dtype=torch.float32)
    tensors, meta = read_lora(result.path)
    te_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
    for prefix, changes in (("lora_unet_", unet_changes), (te_prefix, te_changes)):
        for module, change in changes.items():
            name = kohya_module_name(prefix, module)
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            got = float(tensors[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
            torch.testing.assert_close(got, change.flatten(1), atol=2e-6, rtol=1e-4)
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == len(unet_changes) + len(te_changes) and not any(n.startswith("lora_te2_") for n in names)
    assert any("text_encoder_2: identical" in line for line in result.lines) == (family == "sdxl")
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    # diffusers loads every module, and the base with the extracted LoRA computes what the tuned model does
    fresh = tiny_models.pipeline(family)
    fresh.load_lora_weights(str(result.path), adapter_name="x")
    assert sum(1 for m in (fresh.unet, fresh.text_encoder) for _, mod in m.named_modules()
               if hasattr(mod, "lora_A") and "x" in mod.lora_A) == len(names)
    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_encoder(ids).last_hidden_state, tuned.text_encoder(ids).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
    # Below the true rank: the error is the discarded singular values (Eckart–Young), module by module.
    low = read_lora(extract(folder, root / "tuned", root / "extracted-r1.safetensors", rank=1,
                            dtype=torch.float32).path)[0]
    for module, change in list(unet_changes.items())[:20]:
        name = kohya_module_name("lora_unet_", module)
        got = low[f"{name}.lora_up.weight"].flatten(1) @ low[f"{name}.lora_down.weight"].flatten(1)
        s = torch.linalg.svdvals(change.flatten(1).double())
        assert torch.linalg.norm(got.double() - change.flatten(1)) == pytest.approx(float(s[1:].norm()), rel=1e-3)


def test_cli_bake_and_extract_round_trip(world, capsys):
    """`python -m trainer bake` then `extract` of the baked model against its base gives back the LoRA's deltas
    (the LoRA's rank 4 is the true rank of each ΔW, so extraction at rank 4 is exact)."""
    from trainer.cli import main

    family, root, folder, _, lora = world
    baked = root / "cli-baked"
    assert main(["bake", "--base-model", str(folder), "--lora", f"{lora}:0.5", "--out", str(baked)]) == 0
    assert "weights patched" in capsys.readouterr().out
    out = root / "cli-extracted.safetensors"
    assert main(["extract", "--base-model", str(folder), "--tuned", str(baked), "--rank", "4",
                 "--save-precision", "fp32", "--out", str(out)]) == 0
    assert "kept 100.00%" in capsys.readouterr().out
    given, got = read_lora(lora)[0], read_lora(out)[0]
    names = {k.split(".")[0] for k in given}
    assert {k.split(".")[0] for k in got} == names
    for name in names:
        def delta(t, w=1.0):
            down, up = t[f"{name}.lora_down.weight"].double(), t[f"{name}.lora_up.weight"].double()
            return w * float(t[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        torch.testing.assert_close(delta(got), delta(given, 0.5), atol=1e-5, rtol=1e-3)


def test_extract_takes_resnet_convolutions_with_a_conv_rank(tmp_path):
    from trainer.lora_file import kohya_module_name
    folder = tiny_models.save_diffusers("sd1", tmp_path / "base")
    tuned = tiny_models.pipeline("sd1")
    convs = [f"{b}.{c}" for b, block in tuned.unet.named_modules()
             if type(block).__name__ in ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # kohya's LoCon blocks
             for c, m in block.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    changes = low_rank_change(tuned.unet, convs, 2, 3)
    tuned.save_pretrained(str(tmp_path / "tuned"))
    with pytest.raises(ToolError, match=f"unet: {len(convs)} other layers differ .*--conv-rank"):
        extract(folder, tmp_path / "tuned", tmp_path / "attn.safetensors", rank=4)
    with_convs = extract(folder, tmp_path / "tuned", tmp_path / "locon.safetensors", rank=4, conv_rank=2,
                         dtype=torch.float32)
    tensors = read_lora(with_convs.path)[0]
    for module, change in changes.items():
        name = kohya_module_name("lora_unet_", module)
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == 2 and down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1)  # kohya's LoCon layout
        torch.testing.assert_close(up.flatten(1) @ down.flatten(1), change.flatten(1), atol=2e-6, rtol=1e-4)
    assert not any("other layers differ" in line for line in with_convs.lines)
