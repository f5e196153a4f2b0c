"""Is torch's CPU flash-attention backward the floor? One attention shape, its backward done four ways.

    .venv/bin/python scripts/benchmark_attention_backward.py                      # SD 1.5's 512 px level 0, fp32
    .venv/bin/python scripts/benchmark_attention_backward.py --tokens 1024 --dtype bf16

Why it exists: at 512 px SD 1.5's five 4096-token self-attention layers decide how far a fp32 training step is from
two forward passes (README, scripts/benchmark.py), and torch's flash backward costs ~2.7× its forward there. Each way
below gives the same gradients (the error column, against float64); the times are the best of --repeats
process-CPU measurements on one thread, the ways alternating so that all see the same machine.

- flash: torch's fused kernel (what the trainer runs in fp32): the backward recomputes the probabilities blockwise,
  five matmuls against the forward's two.
- kept probabilities: the trainer's SavedProbabilities (its bf16 path): the forward writes the whole probability
  matrix, the backward is four matmuls and a fused softmax backward, but over matrices far larger than the caches.
- recompute in chunks: flash's forward and logsumexp, then the backward written with torch ops, --chunk query rows
  at a time (the five matmuls plus elementwise passes, each a separate trip through memory).
- flash on query chunks: flash's own backward kernel called per --chunk query rows (key/value gradients summed), in
  case a smaller problem suited its blocking better.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.cpu_attention import SavedProbabilities  # noqa: E402
from trainer.memory import keep_freed_memory  # noqa: E402

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def flash(q, k, v, grad, chunk):
    out, lse = FLASH(q, k, v, 0.0, False)
    return out, lambda: FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, False)


def kept(q, k, v, grad, chunk):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = SavedProbabilities.apply(q, k, v, q.shape[-1] ** -0.5)

    def backward():
        out.backward(grad)
        return q.grad, k.grad, v.grad
    return out.detach(), backward


def recompute(q, k, v, grad, chunk):
    out, lse = FLASH(q, k, v, 0.0, False)

    def backward():
        scale = q.shape[-1] ** -0.5
        gq = torch.empty_like(q)
        gk, gv = torch.zeros(k.shape), torch.zeros(v.shape)  # float32 sums over every chunk
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO ∘ O), softmax backward's term
        kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
        for s in range(0, q.shape[2], chunk):
            rows = slice(s, s + chunk)
            qs, g = q[:, :, rows] * scale, grad[:, :, rows]
            p = torch.matmul(qs, kt).sub_(lse[:, :, rows, None].to(q.dtype)).exp_()  # the probabilities again
            gv.add_(torch.matmul(p.transpose(-1, -2), g))
            ds = torch.matmul(g, vt).sub_(delta[:, :, rows].to(q.dtype)).mul_(p)
            gq[:, :, rows] = torch.matmul(ds, k) * scale
            gk.add_(torch.matmul(ds.transpose(-1, -2), qs))
        return gq, gk.to(k.dtype), gv.to(v.dtype)
    return out, backward


def flash_chunks(q, k, v, grad, chunk):
    out, lse = FLASH(q, k, v, 0.0, False)

    def backward():
        gq, gk, gv = torch.empty_like(q), torch.zeros(k.shape), torch.zeros(v.shape)
        for s in range(0, q.shape[2], chunk):
            rows = slice(s, s + chunk)
            a, b, c = FLASH_BACKWARD(grad[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows],
                                     0.0, False)
            gq[:, :, rows] = a
            gk.add_(b)
            gv.add_(c)
        return gq, gk.to(k.dtype), gv.to(v.dtype)
    return out, backward


WAYS = {"flash": flash, "kept probabilities": kept, "recompute in chunks": recompute,
        "flash on query chunks": flash_chunks}


def _time(way, q, k, v, grad, chunk) -> tuple[float, float]:
    start = time.process_time()
    _, backward = way(q, k, v, grad, chunk)
    middle = time.process_time()
    backward()
    return middle - start, time.process_time() - middle


def _error(way, q, k, v, grad, chunk, reference) -> float:
    out, backward = way(q, k, v, grad, chunk)
    got = [out, *backward()]
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, reference))


def _reference(q, k, v, grad):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(grad.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="query and key tokens (self-attention)")
    p.add_argument("--head-dim", type=int, default=40)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--chunk", type=int, default=256, help="query rows per chunk for the chunked ways")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the trainer on the CPU
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, h, d = args.tokens, args.heads, args.head_dim

    def layout(x):  # as diffusers' processor passes them: a transposed view of (batch, tokens, heads × dim)
        return x.to(dtype).view(1, n, h, d).transpose(1, 2)
    q, k, v, grad = (layout(torch.randn(1, n, h * d)) for _ in range(4))
    times = {name: [] for name in WAYS}
    for name, way in WAYS.items():
        _time(way, q, k, v, grad, args.chunk)  # warm-up
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            times[name].append(_time(way, q, k, v, grad, args.chunk))
    reference = _reference(q, k, v, grad)
    best = {name: (min(t[0] for t in ts), min(t[1] for t in ts)) for name, ts in times.items()}
    flash_fwd, flash_bwd = best["flash"]
    print(f"{args.dtype}, {n} tokens, {h} heads of {d}, chunks of {args.chunk} rows, one thread")
    print(f"{'way':24s} {'fwd ms':>8s} {'bwd ms':>8s} {'bwd/fwd':>8s} {'bwd/flash':>10s} {'all/flash':>10s} "
          f"{'error':>8s}")
    for name, way in WAYS.items():
        fwd, bwd = best[name]
        err = _error(way, q, k, v, grad, args.chunk, reference)
        print(f"{name:24s} {fwd * 1e3:8.1f} {bwd * 1e3:8.1f} {bwd / fwd:8.2f} {bwd / flash_bwd:10.2f} "
              f"{(fwd + bwd) / (flash_fwd + flash_bwd):10.2f} {err:8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
