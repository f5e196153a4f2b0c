"""What a LoRA mix costs per image: merged into the weights (the Generator) against diffusers' unmerged adapters.

    .venv/bin/python scripts/bench/lora_mix.py [--steps 20] [--size 256] [--rank 16] [--threads 1] [--repeats 3]

Full-size SD 1.5 topology (trainer/model_configs/sd1) with seeded random weights, built in memory: nothing is
downloaded or written but three rank-16 kohya LoRAs on the UNet's 192 attention modules and the text encoder's 72
(a temporary folder). One process, one thread by default, the same prompt and seed for every image; each row is one
image (after one warm-up image), timed as CPU seconds of this process (wall seconds too: on a shared machine the
CPU time is the work itself). Rows:
  base            no LoRA
  merged 1 / 3    the Generator: the mix merged into the weights (lora_mix.py)
  unmerged 1 / 3  what the Generator did before: diffusers load_lora_weights + set_adapters, the LoRA branch
                  computed at every step (PEFT)
  change 1 / 3    the Generator's time to change one LoRA's weight / all three weights of the 3-LoRA mix
Targets (issue #14): merged 3 within 3% of base; a mix change ≤ 0.1× one image.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from trainer.config import PROJECT_ROOT as ROOT

SD1_CONFIGS = ROOT / "trainer" / "model_configs" / "sd1"
PROMPT = "a red circle on a white background"


def build_pipeline():
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.generate import make_pipeline
    from trainer.models import TOKENIZER_DIR
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIGS, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIGS, subfolder="vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder"))
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(SD1_CONFIGS, subfolder="scheduler"))
    for m in (unet, vae, te):
        m.requires_grad_(False).eval()
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    return make_pipeline(unet, vae, [te], [tokenizer], sched, "euler")


def write_loras(pipe, folder: Path, rank: int, n: int = 3) -> list[Path]:
    """Kohya files as the trainer exports them (its own targets and key names), random factors."""
    import torch
    from safetensors.torch import save_file

    from trainer.lora_file import kohya_module_name
    from trainer.network import text_target_names, unet_target_names

    modules = {("lora_unet_", n): m for n, m in dict(pipe.unet.named_modules()).items()
               if n in set(unet_target_names(pipe.unet))}
    modules.update({("lora_te_", n): m for n, m in pipe.text_encoder.named_modules()
                    if n in set(text_target_names(pipe.text_encoder))})
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for (prefix, path), m in modules.items():
            name = kohya_module_name(prefix, path)
            w = m.weight
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=gen) * 0.01).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=gen)
                                                 * 0.01).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank / 2))
        paths.append(folder / f"lora{i}.safetensors")
        save_file(tensors, str(paths[-1]), metadata={"ss_base_model_version": "sd_v1"})
    return paths


def timed(fn, label: str = "") -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    row = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    if label:  # as it goes: on a shared machine a run takes long
        print(f"  {label}: {row['cpu_s']:.2f} CPU s, {row['wall_s']:.2f} wall s", flush=True)
    return row


def run(args) -> dict:
    import torch

    from trainer.families import FAMILIES
    from trainer.generate import Generator, LoraSpec, render
    from trainer.memory import keep_freed_memory

    torch.set_num_threads(args.threads)
    # As Generator.load does on a CPU. Without it glibc maps and unmaps each step's big blocks by a threshold that
    # moves as blocks are freed, so the same base image took 46 to 54 s depending on what ran before it.
    keep_freed_memory()
    pipe = build_pipeline()
    folder = Path(tempfile.mkdtemp(prefix="lora-mix-bench-"))
    loras = write_loras(pipe, folder, args.rank)
    pipe.set_progress_bar_config(disable=True)
    gen = Generator()
    gen.use_pipeline(pipe, FAMILIES["sd1"], Path("sd15-random"))
    kw = dict(steps=args.steps, seed=1, cfg=7.0, width=args.size, height=args.size)
    rows = {}

    def image(specs):
        return lambda: gen.generate(PROMPT, specs, **kw)

    one = [LoraSpec(str(loras[0]), 0.8)]
    three = [LoraSpec(str(p), w) for p, w in zip(loras, (0.8, 0.5, 0.3))]
    timed(image([]))  # warm-up: first-call allocations
    rows["base"] = timed(image([]), "base")
    gen.set_loras(one)  # reading the file is a one-off, not a per-image cost
    rows["merged 1"] = timed(image(one), "merged 1")
    gen.set_loras(three)
    rows["merged 3"] = timed(image(three), "merged 3")
    changed = [LoraSpec(str(loras[0]), 0.8), LoraSpec(str(loras[1]), 0.6), LoraSpec(str(loras[2]), 0.3)]
    rows["change 1"] = timed(lambda: gen.set_loras(changed), "change 1")
    moved = [LoraSpec(str(p), w) for p, w in zip(loras, (0.2, 0.4, 0.9))]
    rows["change 3"] = timed(lambda: gen.set_loras(moved), "change 3")
    # Base and merged side by side, alternating: the rows above are minutes apart, and a busy machine drifts by
    # more than the 3% target between them. The ratio of each adjacent pair, their median is the target's.
    paired = []
    for i in range(args.repeats):
        gen.set_loras([])
        b = timed(image([]), f"pair {i + 1}: base")
        gen.set_loras(three)
        paired.append(timed(image(three), f"pair {i + 1}: merged 3")["cpu_s"] / b["cpu_s"])
    rows["paired merged 3 / base"] = {"cpu_s": sorted(paired)[len(paired) // 2], "wall_s": float("nan"),
                                      "each": paired}
    gen.set_loras([])

    # the previous Generator: PEFT adapters, weighted per part with set_adapters, computed every step
    for i, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")

    def unmerged(n, weights):
        def go():
            pipe.enable_lora()
            pipe.set_adapters([f"l{i}" for i in range(n)],
                              adapter_weights=[{"unet": w, "text_encoder": w} for w in weights])
            render(pipe, PROMPT, seed=1, steps=args.steps, cfg=7.0, width=args.size, height=args.size)
        return go

    rows["unmerged 1"] = timed(unmerged(1, [0.8]), "unmerged 1")
    rows["unmerged 3"] = timed(unmerged(3, [0.8, 0.5, 0.3]), "unmerged 3")
    pipe.unload_lora_weights()
    rows["base again"] = timed(image([]), "base again")
    return rows


def report(rows: dict, args) -> dict:
    base = (rows["base"]["cpu_s"] + rows["base again"]["cpu_s"]) / 2
    ratios = {
        "merged 1 / base": rows["merged 1"]["cpu_s"] / base,
        "merged 3 / base (target ≤ 1.03)": rows["merged 3"]["cpu_s"] / base,
        "merged 3 / base, adjacent pairs, median (target ≤ 1.03)": rows["paired merged 3 / base"]["cpu_s"],
        "unmerged 1 / base (before)": rows["unmerged 1"]["cpu_s"] / base,
        "unmerged 3 / base (before)": rows["unmerged 3"]["cpu_s"] / base,
        "merged 3 / unmerged 3": rows["merged 3"]["cpu_s"] / rows["unmerged 3"]["cpu_s"],
        "change 1 weight / one base image (target ≤ 0.1)": rows["change 1"]["cpu_s"] / base,
        "change 3 weights / one base image (target ≤ 0.1)": rows["change 3"]["cpu_s"] / base,
    }
    print(f"SD 1.5 topology, random weights, {args.size} px, {args.steps} steps, CFG 7, euler, "
          f"{args.threads} thread(s), rank-{args.rank} UNet+TE LoRAs")
    print(f"{'row':<14}{'CPU s':>10}{'wall s':>10}")
    for name, r in rows.items():
        if "each" not in r:
            print(f"{name:<14}{r['cpu_s']:>10.2f}{r['wall_s']:>10.2f}")
    for name, v in ratios.items():
        print(f"{v:7.3f}  {name}")
    return {"rows": rows, "ratios": ratios, "args": vars(args)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="base / merged pairs timed side by side")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    result = report(run(args), args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
