"""Mixes merged into the weights: the base comes back bit for bit after any sequence of mixes (fp32, fp16, bf16),
a mix's weights do not depend on the mixes before it, only the changed LoRA's modules are rewritten, and the
merged model computes what an unmerged one (diffusers' own adapters) computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_fixtures
import tiny_models
from trainer.generate import Generator, LoraFamilyError, LoraSpec
from trainer.lora_file import LoraFileError
from trainer.lora_formats import module_deltas, read_lora
from trainer.lora_mix import MergedMix, MixItem


def _parts(pipe) -> dict:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    parts = _parts(tiny_models.pipeline("sd1"))
    made = {}
    for name, kind, kw in (("plain", "lora", {"alpha": 2.0}), ("loha", "loha", {"alpha": 4.0}),
                           ("lokr", "lokr-factored", {"alpha": 2.0}), ("locon", "locon-tucker", {"alpha": 8.0}),
                           ("diff", "diffusers", {"peft_config": {"unet": {"r": 4, "lora_alpha": 8},
                                                                  "text_encoder": {"r": 4, "lora_alpha": 8}}})):
        path = root / f"{name}.safetensors"
        made[name] = (path, lora_fixtures.write_lora(path, kind, parts, seed=len(made), **kw))
    return root, made


def _item(path, parts, unet_w, te_w=None):
    deltas = tuple(module_deltas(read_lora(path), parts))
    return MixItem((str(path),), deltas, unet_w, unet_w if te_w is None else te_w)


def _weights(parts) -> dict:
    return {f"{p}.{k}": v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_sequence_of_mixes_restores_the_base_bit_for_bit(files, dtype):
    _, made = files
    parts = _parts(tiny_models.pipeline("sd1"))
    for m in parts.values():
        m.to(dtype)
    base = _weights(parts)
    mix = MergedMix(parts)
    a = lambda w: _item(made["plain"][0], parts, w)  # noqa: E731
    b = lambda w: _item(made["loha"][0], parts, w, w / 2)  # noqa: E731
    c = lambda w: _item(made["lokr"][0], parts, w)  # noqa: E731
    mix.apply([a(0.7), b(1.0)])
    after_ab = _weights(parts)
    for items in ([a(0.3), b(1.0), c(-1.0)], [c(2.0)], [b(0.5), a(0.7)], [a(1.0)] * 3, [a(0.7), b(1.0)]):
        mix.apply(items)
    now = _weights(parts)  # the same mix again: the same bits, whatever came between
    assert all(torch.equal(now[k], after_ab[k]) for k in base)
    assert any(not torch.equal(now[k], base[k]) for k in base)
    mix.apply([a(0.0), b(0.0), c(0.0)])  # weight 0 everywhere is the base itself
    assert all(torch.equal(v, base[k]) for k, v in _weights(parts).items())
    mix.apply([c(1.0)])
    mix.clear()
    assert all(torch.equal(v, base[k]) for k, v in _weights(parts).items())


def test_merged_weights_are_base_plus_weighted_deltas_and_only_changes_are_rewritten(files):
    _, made = files
    parts = _parts(tiny_models.pipeline("sd1"))
    base = _weights(parts)
    mix = MergedMix(parts)
    items = [_item(made["plain"][0], parts, 0.8, 0.3), _item(made["locon"][0], parts, -0.5)]
    assert mix.apply(items) == len({(d.part, d.module) for i in items for d in i.deltas})
    for key in set(made["plain"][1]) | set(made["locon"][1]):  # the fixtures' independent ΔW
        w = (0.8 if key[0] == "unet" else 0.3) * made["plain"][1].get(key, 0) - 0.5 * made["locon"][1].get(key, 0)
        got = dict(parts[key[0]].named_modules())[key[1]].weight.detach().double().numpy()
        np.testing.assert_allclose(got, base[f"{key[0]}.{key[1]}.weight"].double().numpy() + w, atol=2e-6)
    assert mix.apply(items) == 0  # the same mix: nothing to do
    before = _weights(parts)
    items[1] = _item(made["locon"][0], parts, 0.25)  # one LoRA's weight changes: only its modules are rewritten
    locon_modules = {f"{p}.{m}.weight" for p, m in made["locon"][1]}
    assert mix.apply(items) == len(made["locon"][1])
    after = _weights(parts)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in locon_modules)


@pytest.fixture(scope="module")
def generator(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = tiny_models.save_diffusers("sd1", root / "base")
    gen = Generator(lora_dirs=[files[0]])
    gen.load(base)
    return gen, base


def _unet_out(unet):
    torch.manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        return unet(x, torch.tensor([400]), ctx).sample


def test_generator_matches_diffusers_unmerged_adapters_with_adapter_metadata(files, generator):
    """A diffusers file whose header says alpha 8, rank 4: scale 2 (it was applied at 1 when the header was lost);
    diffusers' own unfused adapters with set_adapters weights compute the same UNet output as our merged weights."""
    gen, _ = generator
    path = files[1]["diff"][0]
    assert read_lora(path).alpha == 8.0
    gen.set_loras([])
    plain = _unet_out(gen.pipe.unet)
    gen.set_loras([LoraSpec(str(path), 0.6, 1.0), LoraSpec(str(files[1]["plain"][0]), -0.4)])
    ours = _unet_out(gen.pipe.unet)
    ref = tiny_models.pipeline("sd1")
    ref.load_lora_weights(str(path), adapter_name="d")
    ref.load_lora_weights(str(files[1]["plain"][0]), adapter_name="p")
    ref.set_adapters(["d", "p"], adapter_weights=[0.6, -0.4])
    torch.testing.assert_close(ours, _unet_out(ref.unet), atol=2e-5, rtol=1e-4)
    gen.set_loras([])
    assert torch.equal(_unet_out(gen.pipe.unet), plain)


def test_weight_zero_gives_the_base_picture_bit_for_bit_for_every_format(files, generator):
    gen, _ = generator
    plain = np.asarray(gen.generate("a red circle", [], steps=2, seed=5))
    for name, (path, _) in files[1].items():
        gen.set_loras([LoraSpec(str(path), 1.0)])
        image = np.asarray(gen.generate("a red circle", [LoraSpec(str(path), 0.0)], steps=2, seed=5))
        assert np.array_equal(image, plain), name


def test_other_family_diffusers_and_peft_files_are_refused_like_kohya_ones(tmp_path, generator):
    gen, base = generator
    xl = tiny_models.pipeline("sdxl")
    diff = tmp_path / "xl-diffusers.safetensors"
    lora_fixtures.write_lora(diff, "diffusers", _parts(xl), limit=20)
    with pytest.raises(LoraFamilyError, match=r"^xl-diffusers.safetensors is a sdxl LoRA but the base model base is sd1: "):
        gen.set_loras([LoraSpec(str(diff))])
    (tmp_path / "unet").mkdir()
    peft = tmp_path / "unet" / "adapter_model.safetensors"
    lora_fixtures.write_lora(peft, "peft", {"unet": xl.unet}, peft_config={"r": 4, "lora_alpha": 4})
    with pytest.raises(LoraFamilyError, match=r"adapter_model.safetensors is a sdxl LoRA but the base model base is sd1"):
        gen.set_loras([LoraSpec(str(peft))])
    dora = tmp_path / "dora.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2), "lora_unet_a.lora_up.weight": torch.zeros(2, 2),
               "lora_unet_a.dora_scale": torch.zeros(1, 2)}, str(dora))
    with pytest.raises(LoraFileError, match=r"^dora.safetensors is a DoRA .* which LoRA Studio does not read") as e:
        gen.set_loras([LoraSpec(str(dora))])
    assert "\n" not in str(e.value)


def test_gallery_lists_every_format_and_names_unsupported_files_in_one_line(files, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from app import gallery_tab as g
    from app.folders import Folders

    folders = Folders.create(tmp_path / "models", tmp_path / "out")
    for name, (path, _) in files[1].items():
        shutil.copy(path, folders.lora_dir / path.name)
    save_file({"lora_unet_a.oft_blocks": torch.zeros(2, 2, 2)}, str(folders.lora_dir / "oft.safetensors"))
    entries = {e["name"]: e for e in g.LoraIndex(folders).entries()}
    assert {k: entries[k]["format"] for k in entries} == {
        "plain": "kohya-lora", "loha": "loha", "lokr": "lokr", "locon": "locon", "diff": "diffusers",
        "oft": "unsupported"}
    assert entries["loha"]["family"] == "sd1" and entries["loha"]["rank"] == 4 and entries["loha"]["alpha"] == 4.0
    assert entries["diff"]["alpha"] == 8.0  # from lora_adapter_metadata
    error = entries["oft"]["info"]["error"]
    assert error.startswith("oft.safetensors is an OFT file, which LoRA Studio does not read") and "\n" not in error
