"""What resizing a LoRA costs: the SVD of up @ down through QR of the factors (trainer/tools/lowrank.py,
svd_of_product) against the SVD of the full ΔW, on every module of a full-size LoRA.

    .venv/bin/python scripts/bench/tools_svd.py [--family sd1|sdxl] [--rank 32] [--threads 1]

Module shapes come from the family's shipped config (trainer/model_configs, a weightless skeleton): SD 1.5's 192
UNet attention modules and 72 CLIP layers, or SDXL's 722 + 72 + 192. Random rank-`rank` factors; nothing is read or
written. One process, the same factors for both ways; CPU seconds of this process (and wall seconds). Prints one
JSON line per way, then their ratio, and the largest difference between the two ways' rank-8 truncations
(relative to the delta's norm: both are the same best approximation).
"""
from __future__ import annotations

import argparse
import json
import time


def modules(family: str, rank: int):
    import torch

    from trainer.network import text_target_names, unet_target_names
    from trainer.tools.source import skeleton

    parts = skeleton(family)
    gen = torch.Generator().manual_seed(0)
    out = []
    for part, model in parts.items():
        names = unet_target_names(model) if part == "unet" else text_target_names(model)
        for name in names:
            w = model.get_submodule(name).weight
            up = torch.randn(w.shape[0], rank, generator=gen) * 0.01
            down = torch.randn(rank, w[0].numel(), generator=gen) * 0.01
            out.append((up, down))
    return out


def timed(fn, pairs):
    cpu, wall = time.process_time(), time.perf_counter()
    results = [fn(up, down) for up, down in pairs]
    return time.process_time() - cpu, time.perf_counter() - wall, results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    from trainer.tools.lowrank import RankRule, svd, svd_of_product, truncate

    torch.set_num_threads(args.threads)
    pairs = modules(args.family, args.rank)
    rule = RankRule(8)

    def product(up, down):
        u, s, vh = svd_of_product(up, down)
        return truncate(u, s, vh, (up.shape[0], down.shape[1]), rule)

    def full(up, down):
        u, s, vh = svd(up @ down)
        return truncate(u, s, vh, (up.shape[0], down.shape[1]), rule)

    rows = {}
    for name, fn in (("svd_of_product", product), ("full_svd", full)):
        cpu, wall, results = timed(fn, pairs)
        rows[name] = results
        print(json.dumps({"way": name, "family": args.family, "modules": len(pairs), "rank": args.rank,
                          "threads": args.threads, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}))
        rows[name + "_cpu"] = cpu
    worst = max(float((a.up @ a.down - b.up @ b.down).norm() / (up @ down).norm())
                for a, b, (up, down) in zip(rows["svd_of_product"], rows["full_svd"], pairs))
    print(json.dumps({"full_svd_over_product_cpu": round(rows["full_svd_cpu"] / rows["svd_of_product_cpu"], 1),
                      "max_relative_difference_of_truncations": f"{worst:.1e}"}))


if __name__ == "__main__":
    main()
