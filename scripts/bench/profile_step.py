"""Where a LoRA training step's time goes: torch's profiler over one forward and, separately, its backward.

    .venv/bin/python scripts/bench/profile_step.py --model-dir /tmp/sd15 --resolution 512 --precision fp32

The UNet of a diffusers folder (scripts/bench/training.py --model-dir makes a random-weight SD 1.5 one) with the trainer's
LoRA (rank 8, UNet only), lean forwards and CPU attention, one thread, the trainer's allocator setting: the bare step
of scripts/bench/training.py's fwdbwd variants. Prints the total of each phase and its top ops by self CPU time, so a
backward op can be set against the forward op it mirrors (flash attention's backward against its forward, convolution
input gradients against convolutions, ...).
"""
from __future__ import annotations

import argparse
import sys

import torch

from trainer.config import NetworkConfig
from trainer.cpu_attention import use_cpu_training_attention
from trainer.lean import lean_forwards
from trainer.memory import keep_freed_memory
from trainer.network import add_lora


def _self_times(prof) -> dict[str, float]:
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a diffusers folder with a unet/ subfolder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    keep_freed_memory()
    bf16 = args.precision == "bf16"
    unet = UNet2DConditionModel.from_pretrained(args.model_dir, subfolder="unet", local_files_only=True,
                                                torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    add_lora(unet, [], NetworkConfig(rank=8, alpha=8.0, train_text_encoder=False))
    lean_forwards(unet)
    use_cpu_training_attention(unet)
    unet.train()
    gen = torch.Generator().manual_seed(0)
    side = args.resolution // 8
    latents, text = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 77, 768, generator=gen)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return unet(latents, torch.tensor([500]), text).sample.float().pow(2).mean()

    for _ in range(2):  # warm-up: allocator, caches, the attention budget's decisions
        forward().backward()
        unet.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof_forward:
        loss = forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof_backward:
        loss.backward()
    for name, prof in (("forward", prof_forward), ("backward", prof_backward)):
        times = _self_times(prof)
        print(f"{name}: {sum(times.values()):.2f} s of CPU in all")
        for key, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {key[:64]:64s} {seconds:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
