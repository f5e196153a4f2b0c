"""A 5-weight LoRA sweep rendered in one batched call (trainer/batched_mix.py) against five separate pictures.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/batched_mix.py [--models demo,sd15] [--repeats 2]

Side by side in one process and one run, on the demo model (models/demo, 64 px, 20 steps) and on SD 1.5's full
topology at 256 px (860M-parameter UNet, its VAE and CLIP-L, built in code with seeded random weights: nothing is
downloaded; random weights cost the same FLOPs as trained ones). The LoRA is a random rank-8 kohya file over
kohya's default targets (UNet and text encoder), written by this script. Both paths are the Gallery's: "separate"
is Generator.generate once per weight (the single-picture path: the mix merged into the weights), "batched" is
Generator.sweep (one pipeline call, the UNet at batch 10 under classifier-free guidance), "floor" five pictures
without any LoRA (what a single-picture path costs at best: no merging either). Repeats alternate the order (AB, BA, ...); the median counts.
Wall seconds and process CPU seconds are both printed; with one thread on a shared machine CPU seconds measure the
work itself and the verdicts use them. The pictures of both paths are compared (largest uint8 difference).
The arithmetic for a GPU: FLOPs and aten kernel calls of one UNet call, counted at batch 2 and 10.
Targets (issue 20): batched / separate ≤ 0.5 on the demo model, ≤ 0.9 at 256 px on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import PROJECT_ROOT as ROOT
from trainer.generate import Generator, LoraSpec, make_pipeline
from trainer.lora_file import kohya_module_name, save_lora
from trainer.network import TEXT_TARGETS, text_target_names, unet_target_names

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = {"demo": 0.5, "sd15": 0.9}
PROMPT = "a red circle on a gray background"


def sd15_generator(seed: int = 0) -> Generator:
    """SD 1.5's topology with seeded random weights, in memory (scripts/benchmark.py saves the same to disk)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.families import get_family

    configs, tok = ROOT / "trainer" / "model_configs" / "sd1", ROOT / "trainer" / "tokenizer"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs, subfolder="unet")).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs, subfolder="vae")).eval()
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")).eval()
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77)
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(configs, subfolder="scheduler"))
    for model in (unet, vae, te):
        model.requires_grad_(False)
    gen = Generator()
    gen.use_pipeline(make_pipeline(unet, vae, [te], [tokenizer], scheduler), get_family("sd1"),
                     Path("sd15-random-weights"))
    return gen


def random_lora(gen: Generator, path: Path, rank: int = 8, seed: int = 1) -> Path:
    """A kohya LoRA on kohya's default targets with random up and down weights (a trained one costs the same)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [("lora_unet_", gen.pipe.unet, unet_target_names(gen.pipe.unet)),
               ("lora_te_", gen.pipe.text_encoder, text_target_names(gen.pipe.text_encoder))]
    for prefix, model, names in targets:
        modules = dict(model.named_modules())
        for name in names:
            w = modules[name].weight
            key = prefix + name.replace(".", "_") if prefix == "lora_unet_" else kohya_module_name(prefix, name)
            extra = (1, 1) if w.dim() == 4 else ()
            tensors[f"{key}.lora_down.weight"] = torch.randn((rank, w.shape[1], *extra), generator=g) * 0.05
            tensors[f"{key}.lora_up.weight"] = torch.randn((w.shape[0], rank, *extra), generator=g) * 0.05
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    assert TEXT_TARGETS  # the text-encoder targets above are network.py's
    return save_lora(path, tensors, {"ss_base_model_version": "sd_v1"})


def clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


class KernelCount(TorchDispatchMode):
    """aten calls: on a GPU each is at least one kernel launch, a fixed cost whatever the batch."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def unet_arithmetic(gen: Generator, size: int, lora: Path) -> dict:
    """FLOPs and aten calls of one UNet call at batch 2 (one picture under guidance) and 10 (five), the latter also
    with the batched path's LoRA hooks on."""
    from trainer.batched_mix import SampleMixes, pipe_parts

    unet = gen.pipe.unet
    latent = size // gen.pipe.vae_scale_factor
    out = {"unet_params": sum(p.numel() for p in unet.parameters())}
    for batch in (2, 10):
        x = torch.randn(batch, 4, latent, latent)
        ctx = torch.randn(batch, 77, unet.config.cross_attention_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            unet(x, torch.tensor([500] * batch), ctx)
        with torch.no_grad(), KernelCount() as kernels:
            unet(x, torch.tensor([500] * batch), ctx)
        out[f"gflop_batch{batch}"] = flops.get_total_flops() / 1e9
        out[f"aten_calls_batch{batch}"] = kernels.calls
    gen.set_loras([])
    with SampleMixes(pipe_parts(gen.pipe), [gen.lora_deltas(Path(lora).resolve())[1]]) as mixes:
        mixes.set_weights("unet", torch.linspace(0, 1, 5)[:, None])
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            unet(x, torch.tensor([500] * 10), ctx)
        with torch.no_grad(), KernelCount() as kernels:
            unet(x, torch.tensor([500] * 10), ctx)
    out["gflop_batch10_hooks"] = flops.get_total_flops() / 1e9
    out["aten_calls_batch10_hooks"] = kernels.calls
    return out


def bench(name: str, gen: Generator, lora: Path, size: int, steps: int, repeats: int, floor: bool) -> dict:
    kw = dict(seed=1, steps=steps, cfg=7.0, width=size, height=size)

    def separate():
        return [gen.generate(PROMPT, [LoraSpec(str(lora), w)], **kw) for w in WEIGHTS]

    def merged_floor():  # what a single-picture path that merges ΔW into the weights costs at best: no LoRA work
        return [gen.generate(PROMPT, [], **kw) for _ in WEIGHTS]

    def batched():
        return gen.sweep(PROMPT, LoraSpec(str(lora)), WEIGHTS, negative_prompt="", **kw)[1]

    def batched_floor():  # batching alone, no LoRA work: the most a batched sweep can save on this machine
        from trainer.batched_mix import Picture
        return gen.generate_batch([Picture(PROMPT, [], "", kw["seed"]) for _ in WEIGHTS],
                                  **{k: v for k, v in kw.items() if k != "seed"})

    gen.generate(PROMPT, [LoraSpec(str(lora), 0.5)], **{**kw, "steps": 1})  # first calls: allocator, adapter load
    gen.sweep(PROMPT, LoraSpec(str(lora)), WEIGHTS[:2], **{**kw, "steps": 1})
    paths = {"separate": separate, "batched": batched,
             **({"floor": merged_floor, "batched_floor": batched_floor} if floor else {})}
    runs = {name: [] for name in paths}
    images = {}
    for r in range(repeats):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for which in order:
            wall, cpu, images[which] = clock(paths[which])
            runs[which].append((wall, cpu))
            print(f"  {name} {which}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
               for a, b in zip(images["separate"], images["batched"]))
    result = {"size": size, "steps": steps, "repeats": repeats, "max_pixel_difference": diff}
    for which, values in runs.items():
        result[f"{which}_wall_s"] = median(v[0] for v in values)
        result[f"{which}_cpu_s"] = median(v[1] for v in values)
    result["ratio_cpu"] = result["batched_cpu_s"] / result["separate_cpu_s"]
    result["ratio_wall"] = result["batched_wall_s"] / result["separate_wall_s"]
    if floor:
        result["ratio_cpu_vs_floor"] = result["batched_cpu_s"] / result["floor_cpu_s"]
        result["ratio_batching_alone"] = result["batched_floor_cpu_s"] / result["floor_cpu_s"]
    result.update(unet_arithmetic(gen, size, lora))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="demo,sd15")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--demo-steps", type=int, default=20)
    p.add_argument("--sd15-steps", type=int, default=4)
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time five pictures without LoRAs (--no-floor saves a third of the time)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    results = {"torch_threads": torch.get_num_threads(), "weights": list(WEIGHTS)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "demo":
                gen = Generator()
                gen.load(ROOT / "models" / "demo")
                size, steps = 64, args.demo_steps
            elif name == "sd15":
                gen, size, steps = sd15_generator(), 256, args.sd15_steps
            else:
                raise SystemExit(f"--models: unknown model {name!r}; use demo and/or sd15")
            lora = random_lora(gen, Path(tmp) / f"{name}.safetensors")
            results[name] = bench(name, gen, lora, size, steps, args.repeats, args.floor)
            del gen
    print(f"\n{'model':6} {'px':>4} {'steps':>5} {'separate s':>11} {'batched s':>10} {'ratio':>6} {'target':>6}  "
          "(CPU seconds; wall ratio)")
    for name in args.models.split(","):
        r = results[name]
        verdict = "ok" if r["ratio_cpu"] <= TARGETS[name] else "MISSED"
        print(f"{name:6} {r['size']:>4} {r['steps']:>5} {r['separate_cpu_s']:>11.2f} {r['batched_cpu_s']:>10.2f} "
              f"{r['ratio_cpu']:>6.2f} {TARGETS[name]:>6} {verdict}; wall {r['ratio_wall']:.2f}; pictures differ by "
              f"≤ {r['max_pixel_difference']} of 255")
        if "ratio_cpu_vs_floor" in r:
            print(f"       against five pictures without any LoRA work ({r['floor_cpu_s']:.2f} s, the best a single-picture "
                  f"path that merges ΔW into the weights can do): {r['ratio_cpu_vs_floor']:.2f}; the same five "
                  f"without LoRAs batched against separate (what batching alone saves here): "
                  f"{r['ratio_batching_alone']:.2f}")
        print(f"       UNet call: {r['gflop_batch2']:.1f} GFLOP and {r['aten_calls_batch2']} aten calls at batch 2, "
              f"{r['gflop_batch10']:.1f} GFLOP and {r['aten_calls_batch10']} at batch 10; "
              f"{r['unet_params'] * 2 / 1e9:.2f} GB of fp16 weights read per call; with the LoRA hooks at batch 10: "
              f"{r['gflop_batch10_hooks']:.1f} GFLOP, {r['aten_calls_batch10_hooks']} aten calls")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
