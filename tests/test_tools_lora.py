"""resize and merge, checked against deltas computed here from the files (float64 SVD, sums of up @ down) and
against diffusers' own loader: every key of an output is consumed and reproduces the computed model."""
from __future__ import annotations

import json
import re

import pytest
import torch

import tiny_models
from trainer.cli import main
from trainer.lora_file import read_lora
from trainer.tools import RankRule, ToolError, merge, parse_dynamic, resize


def deltas(path) -> dict[str, torch.Tensor]:
    """kohya module name → (alpha / r) · up @ down in float64, from the file's tensors alone."""
    tensors, _ = read_lora(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].double(), tensors[f"{name}.lora_up.weight"].double()
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
            out[name] = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=4, alpha=2.0, seed=1)
    a = tiny_models.export_kohya(pipe, encoders, cfg, root / "a.safetensors", dtype=torch.float32)
    pipe, encoders, cfg = tiny_models.lora_pipeline("sd1", rank=2, alpha=1.0, seed=2)
    b = tiny_models.export_kohya(pipe, encoders[:0], cfg, root / "b.safetensors", dtype=torch.float32)  # UNet only
    return root, a, b


def unet_out(pipe) -> torch.Tensor:
    torch.manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), ctx).sample


def loaded(*files_weights):
    """The tiny base with the files loaded by diffusers as adapters at the given weights; every key consumed."""
    pipe = tiny_models.pipeline("sd1")
    names = []
    for i, (path, _) in enumerate(files_weights):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
        n_file = len({k.split(".")[0] for k in read_lora(path)[0]})
        n_layers = sum(1 for m in [pipe.unet, pipe.text_encoder] for _, mod in m.named_modules()
                       if hasattr(mod, "lora_A") and f"l{i}" in mod.lora_A)
        assert n_layers == n_file  # diffusers made a LoRA layer of every module in the file
    pipe.set_adapters(names, [w for _, w in files_weights])
    return pipe


def test_resize_is_the_best_rank_r_approximation_and_reports_the_kept_energy(loras):
    root, a, _ = loras
    result = resize(a, root / "a-r2.safetensors", RankRule(2))
    before, after = deltas(a), deltas(result.path)
    assert set(after) == set(before)
    kept = {"unet": 0.0, "te": 0.0}
    total = dict(kept)
    for name, d in before.items():
        u, s, vh = torch.linalg.svd(d)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(after[name], best, atol=1e-6, rtol=1e-5)
        # Eckart–Young: the error is exactly the discarded singular values
        assert torch.linalg.norm(after[name] - d) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)
        part = name.split("_")[1]
        kept[part] += float(s[:2].square().sum())
        total[part] += float(s.square().sum())
    reported = dict(re.findall(r"^(\w+): .* kept ([\d.]+)%", "\n".join(result.lines), re.M))
    assert float(reported["unet"]) == pytest.approx(100 * kept["unet"] / total["unet"], abs=0.006)
    assert float(reported["text_encoder"]) == pytest.approx(100 * kept["te"] / total["te"], abs=0.006)
    tensors, meta = read_lora(result.path)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert meta["ss_network_dim"] == "2" and meta["ss_output_name"] == "a-r2"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_shapes": {"red": 2}}  # the training info stays


def test_resize_at_or_above_the_true_rank_reproduces_the_lora_in_diffusers(loras):
    root, a, _ = loras
    out = resize(a, root / "a-r6.safetensors", RankRule(6)).path
    before, after = deltas(a), deltas(out)
    for name, d in before.items():
        torch.testing.assert_close(after[name], d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unet_out(loaded((out, 1.0))), unet_out(loaded((a, 1.0))), atol=1e-5, rtol=1e-4)


def test_dynamic_rank_follows_kohya_rules(loras):
    root, a, _ = loras
    before = deltas(a)
    for spec in ("sv_fro:0.9", "sv_ratio:2.5", "sv_cumulative:0.8"):
        method, x = spec.split(":")
        x = float(x)
        after = deltas(resize(a, root / f"a-{method}.safetensors", parse_dynamic(spec, 3)).path)
        for name, d in before.items():
            s = torch.linalg.svdvals(d)
            if method == "sv_fro":  # the fewest values whose Frobenius norm reaches x of the whole
                want = next(r for r in range(1, 5) if s[:r].square().sum().sqrt() >= x * s.square().sum().sqrt())
            elif method == "sv_ratio":
                want = int((s >= s[0] / x).sum())
            else:
                want = next(r for r in range(1, 5) if s[:r].sum() >= x * s.sum())
            assert torch.linalg.matrix_rank(after[name].float(), rtol=1e-5) == min(want, 3), (spec, name)


def test_merge_is_the_weighted_sum_of_the_deltas_and_diffusers_agrees(loras):
    root, a, b = loras
    out = merge([(a, 0.7), (b, -0.4)], root / "ab.safetensors").path
    da, db, merged = deltas(a), deltas(b), deltas(out)
    assert set(merged) == set(da) | set(db)  # b has no text encoder: a's stays
    for name in merged:
        want = 0.7 * da[name] + (-0.4 * db[name] if name in db else 0)
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=1e-5)
    ranks = {t.shape[0] for k, t in read_lora(out)[0].items()
             if k.startswith("lora_unet") and k.endswith("lora_down.weight")}
    assert ranks == {6}  # exact: the ranks side by side
    torch.testing.assert_close(unet_out(loaded((out, 1.0))), unet_out(loaded((a, 0.7), (b, -0.4))),
                               atol=1e-5, rtol=1e-4)
    meta = read_lora(out)[1]
    assert [s["weight"] for s in json.loads(meta["lora_studio.merged_from"])] == [0.7, -0.4]


def test_merge_to_a_rank_is_the_best_approximation_of_the_sum(loras):
    root, a, b = loras
    out = merge([(a, 1.0), (b, 1.0)], root / "ab3.safetensors", rank=3).path
    da, db, merged = deltas(a), deltas(b), deltas(out)
    for name in merged:
        u, s, vh = torch.linalg.svd(da[name] + db.get(name, 0))
        torch.testing.assert_close(merged[name], (u[:, :3] * s[:3]) @ vh[:3], atol=1e-6, rtol=1e-5)


def test_outputs_never_replace_an_input_or_an_existing_file_unasked(loras, capsys):
    root, a, b = loras
    with pytest.raises(ToolError, match="also an input"):
        resize(a, a, RankRule(2), overwrite=True)
    target = root / "taken.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(ToolError, match="already exists.*--overwrite"):
        merge([(a, 1.0)], target)
    assert target.read_bytes() == b"keep me"
    assert main(["merge", str(a), str(b) + ":0.5", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err  # one line naming the file and the fix
    assert main(["merge", str(a), str(b) + ":0.5", "--out", str(target), "--overwrite"]) == 0
    assert set(deltas(target)) == set(deltas(a))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("argv, message", [
    (["resize", "{a}", "--out", "{root}/x.safetensors"], "--rank R"),
    (["resize", "{a}", "--dynamic", "sv_fro:1.5", "--out", "{root}/x.safetensors"], "sv_fro:1.5"),
    (["resize", "{a}", "--rank", "2", "--out", "{root}/x.pt"], "must end in .safetensors"),
    (["merge", "{root}/missing.safetensors", "--out", "{root}/x.safetensors"], "missing.safetensors"),
])
def test_refusals_are_one_line_naming_the_value(loras, capsys, argv, message):
    root, a, _ = loras
    assert main([x.format(a=a, root=root) for x in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (root / "x.safetensors").exists()
