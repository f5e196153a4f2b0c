"""LoRA layers at SD 1.5's shapes, forward + backward: PEFT's own forward against trainer/lean.py's fused one.

    .venv/bin/python scripts/bench/lora_layers.py                 # 512 px, bf16 and fp32, one thread
    .venv/bin/python scripts/bench/lora_layers.py --resolution 256 --repeats 9

Each row is one LoRA'd layer of SD 1.5's UNet (rank 8, batch 1) as the trainer runs it: frozen base (bf16 under
autocast, or fp32), LoRA weights in fp32, gradients for the input and both LoRA weights. Three timings per row,
alternating so that all see the same machine: the frozen base layer alone, PEFT's LoRA layer, and the same layer
after `lean_forwards` (trainer/lean.py). "overhead" is what the LoRA adds to the base layer; the last line sums
the rows times how often each layer occurs in the UNet (best of --repeats, process CPU time).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, inject_adapter_in_model

from trainer.lean import lean_forwards
from trainer.memory import keep_freed_memory


def layers(resolution: int) -> list[tuple[str, str, int, int, int, int]]:
    """(name, kind, tokens or pixels, in, out, occurrences) of SD 1.5's LoRA'd Linears and 1x1 convs."""
    rows = []
    for level, (width, side, blocks) in enumerate([(320, resolution // 8, 5), (640, resolution // 16, 5),
                                                    (1280, resolution // 32, 5), (1280, resolution // 64, 1)]):
        tag = f"level {level}" if level < 3 else "mid"
        tokens = side * side
        rows += [(f"{tag} q/k/v/out, cross q", "linear", tokens, width, width, 6 * blocks),
                 (f"{tag} cross k/v (77 tokens)", "linear", 77, 768, width, 2 * blocks),
                 (f"{tag} ff proj", "linear", tokens, width, 8 * width, blocks),
                 (f"{tag} proj_in/out 1x1", "conv", side, width, width, 2 * blocks)]
    return rows


def _layer(kind: str, width: int, out: int, dtype: torch.dtype) -> torch.nn.Module:
    base = torch.nn.Conv2d(width, out, 1) if kind == "conv" else torch.nn.Linear(width, out)
    model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["0"]), torch.nn.Sequential(base))
    model.requires_grad_(False).to(dtype)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.05  # fp32, non-zero up: as after some training
            p.requires_grad_(True)
    return model


def _time(fn, x: torch.Tensor, bf16: bool) -> float:
    start = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = fn(x)
    y.backward(torch.ones_like(y))
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="bf16,fp32")
    args = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the trainer does on the CPU
    print(f"{'layer':30s} {'dtype':5s} {'x':>4s} {'base ms':>8s} {'PEFT ms':>8s} {'ours ms':>8s} "
          f"{'overhead PEFT':>14s} {'ours':>6s}")
    for name_dtype in args.dtypes.split(","):
        bf16 = name_dtype == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        totals = [0.0, 0.0, 0.0]
        for name, kind, size, width, out, count in layers(args.resolution):
            peft = _layer(kind, width, out, dtype)
            ours = copy.deepcopy(peft)
            lean_forwards(ours)
            base = peft[0].get_base_layer()
            shape = (1, width, size, size) if kind == "conv" else (1, size, width)
            x = torch.randn(shape).requires_grad_()  # fp32 activations, as autocast leaves them
            runs = [[_time(fn, x, bf16) for fn in (base, peft, ours)] for _ in range(args.repeats)]
            best = [min(r[i] for r in runs) for i in range(3)]
            totals = [t + b * count for t, b in zip(totals, best)]
            ms = [b * 1e3 for b in best]
            print(f"{name:30s} {name_dtype:5s} {count:4d} {ms[0]:8.2f} {ms[1]:8.2f} {ms[2]:8.2f} "
                  f"{ms[1] - ms[0]:14.2f} {ms[2] - ms[0]:6.2f}")
        over_peft, over_ours = totals[1] - totals[0], totals[2] - totals[0]
        print(f"UNet at {args.resolution} px, {name_dtype}: LoRA layers {totals[1]:.2f} s with PEFT, {totals[2]:.2f} s "
              f"ours ({totals[2] / totals[1]:.3f}x); LoRA overhead {over_peft:.2f} s / {over_ours:.2f} s "
              f"({over_ours / over_peft:.2f}x)")


if __name__ == "__main__":
    main()
