"""Attention forward + backward at SD 1.5's shapes: torch's flash attention against trainer/cpu_attention.py.

    .venv/bin/python scripts/bench/attention.py            # bf16 and fp32, one thread
    .venv/bin/python scripts/bench/attention.py --repeats 9

Each shape is (query tokens, key tokens, head dim) with 8 heads and batch 1, laid out as diffusers' attention
processor passes them (a transposed view of the projections). Times are the best of --repeats process-CPU
measurements of one forward and backward (and of the forward alone: "forward only", ours / flash), the two
implementations alternating, so that both see the same machine.
The "ours" column is what the trainer runs for a call that finds --memory-mb of its budget free: the probabilities of
as many query rows as fit are kept (SavedProbabilities), flash takes the rest and any call the rule declines (fp32);
--force keeps them for every shape and dtype, which is why the rule declines where it does. Prints a table and the
ratios.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from trainer.cpu_attention import DEFAULT_MEMORY_MB, attention, rows_to_keep
from trainer.memory import keep_freed_memory

SHAPES = [  # SD 1.5: level 0 (320 wide, 40 per head), level 1 (640, 80), level 2 (1280, 160)
    ("256 px level 0 self", 1024, 1024, 40), ("256 px level 0 cross", 1024, 77, 40),
    ("256 px level 1 self", 256, 256, 80), ("256 px level 1 cross", 256, 77, 80),
    ("256 px level 2 self", 64, 64, 160), ("256 px level 2 cross", 64, 77, 160),
    ("512 px level 0 self", 4096, 4096, 40), ("512 px level 0 cross", 4096, 77, 40),
    ("512 px level 1 self", 1024, 1024, 80), ("512 px level 1 cross", 1024, 77, 80),
]
HEADS = 8


def _inputs(lq: int, lk: int, dim: int, dtype: torch.dtype):
    def one(n):
        return torch.randn(1, n, HEADS * dim).to(dtype).view(1, n, HEADS, dim).transpose(1, 2).requires_grad_()
    return one(lq), one(lk), one(lk)


def _flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


FORCE = False
AVAILABLE = DEFAULT_MEMORY_MB * 2**20


def _rows(q, k) -> int:
    return q.shape[2] if FORCE else rows_to_keep(q, k, AVAILABLE)


def _ours(q, k, v):
    return attention(q, k, v, q.shape[-1] ** -0.5, _rows(q, k))


def _time(fn, q, k, v) -> tuple[float, float]:
    """(forward, forward + backward) process-CPU seconds."""
    for t in (q, k, v):
        t.grad = None
    start = time.process_time()
    out = fn(q, k, v)
    forward = time.process_time() - start
    out.backward(torch.ones_like(out))
    return forward, time.process_time() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--force", action="store_true", help="SavedProbabilities for every shape and dtype")
    p.add_argument("--memory-mb", type=float, default=DEFAULT_MEMORY_MB,
                   help="budget left for each call (training.attention_memory_mb; default %(default)s)")
    args = p.parse_args()
    global FORCE, AVAILABLE
    FORCE, AVAILABLE = args.force, int(args.memory_mb * 2**20)
    torch.set_num_threads(1)
    # As the trainer on the CPU: freed blocks serve the next call. Without it every call of the large shapes faults
    # hundreds of MB of fresh pages in, which is what this measured before (4096 tokens: 1.11× instead of 0.68×).
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"{'shape':24s} {'dtype':5s} {'flash ms':>9s} {'ours ms':>9s} {'ours/flash':>11s} {'forward only':>13s}"
          "  path")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        for label, lq, lk, dim in SHAPES:
            q, k, v = _inputs(lq, lk, dim, dtype)
            _time(_flash, q, k, v), _time(_ours, q, k, v)  # warm-up
            flash, ours = [], []
            for _ in range(args.repeats):
                flash.append(_time(_flash, q, k, v))
                ours.append(_time(_ours, q, k, v))
            (flash_fwd, flash_all), (ours_fwd, ours_all) = ([min(t[i] for t in times) for i in (0, 1)]
                                                            for times in (flash, ours))
            rows = _rows(q, k)
            path = ("saved probabilities" if rows == lq else "flash (rule declines)" if rows == 0
                    else f"saved probabilities for {rows} of {lq} rows, flash for the rest")
            print(f"{label:24s} {name:5s} {flash_all * 1e3:9.1f} {ours_all * 1e3:9.1f} "
                  f"{ours_all / flash_all:11.2f} {ours_fwd / flash_fwd:13.2f}  {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
