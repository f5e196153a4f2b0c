"""Attention for training in bf16/fp16 on the CPU: keep the probabilities instead of recomputing them.

torch's CPU flash attention recomputes the attention probabilities in backward (five matmuls in all), and its
backward costs 2-3× its forward in bf16. Attention as three plain ops (Q·Kᵀ, softmax, ·V) with the probabilities
saved costs four matmuls and a fused softmax backward, and its bf16 matmuls run at the CPU's bf16 speed where flash's
blocks do not. `scripts/bench/attention.py` (forward + backward, one thread, SD 1.5 shapes, 8 heads, the
trainer's allocator setting; ours / flash): bf16 cross-attention 0.42-0.55×, self-attention over 64-1024 tokens
0.46-0.64×, 4096 tokens (SD 1.5 at 512 px) 0.68× (its forward alone 0.70×).

What it costs is memory: the probabilities stay until backward, 256 MB for each of SD 1.5's five 4096-token layers at
512 px. `training.attention_memory_mb` bounds what one forward pass keeps; calls are served in order, a call that
does not fit keeps as many query rows as do (rows are independent) and flash takes the rest. `scripts/bench/training.py`,
SD 1.5, bf16 (docs/benchmark-results/2026-11-28-sd15-cpu-attention-budget.json, ours-auto / ours-auto-nokeep):
at 512 px the default 1024 MB makes a step 0.89× as long as keeping none (11.6 against 13.0 s; 2.13× the forward
pass instead of 2.40×) for 0.75 GB more peak RSS (4.35 against 3.60 GB; 1.2 GB more during the steps: the kept bytes,
backward's dP block and the heap's holes between steps), still under the plain diffusers + PEFT loop's 5.25 GB.
At 256 px all of it fits in about 100 MB: 0.95×. Keeping all five layers (1.3 GB) gave 2.09× for 1.8 GB more.
In fp32, self-attention over 1024-4096 tokens is 5-8% slower this way (its forward 17-29%), the rest gains 2-13%:
flash is kept for fp32.

The rule (`rows_to_keep`): CPU, gradients on, bf16/fp16 inputs, no mask, budget left. Anything else takes diffusers'
own AttnProcessor2_0 (flash attention). Precision: outputs and gradients within bf16's rounding of the exact ones
(the probabilities are kept in bf16 as the matmul with V uses them; about twice flash's error, which keeps them in
fp32 inside the kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

DEFAULT_MEMORY_MB = 1024  # training.attention_memory_mb's default


class SavedProbabilities(torch.autograd.Function):
    """softmax(Q·Kᵀ·scale)·V for (batch, heads, length, dim) tensors, keeping the probabilities for backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        qs = q * scale
        scores = torch.matmul(qs, k.transpose(-1, -2))
        # In place: the scores' buffer becomes the probabilities (torch's row-wise kernel reads each row before it
        # writes it; tests/test_cpu_attention.py checks against torch.softmax), one (L × L) buffer instead of two.
        p = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        ctx.save_for_backward(qs, k, v, p)
        ctx.scale = scale
        return torch.matmul(p, v)

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, p = ctx.saved_tensors
        grad_v = torch.matmul(p.transpose(-1, -2), grad_out)
        # dS = P ⊙ (dP − rowsum(dP ⊙ P)): torch's fused softmax backward, in place into dP's buffer (as above)
        grad_p = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_s = torch.ops.aten._softmax_backward_data.out(grad_p, p, -1, p.dtype, grad_input=grad_p)
        grad_q = torch.matmul(grad_s, k) * ctx.scale
        grad_k = torch.matmul(grad_s.transpose(-1, -2), qs)
        return grad_q, grad_k, grad_v, None


BLOCK_BYTES = 32 * 2**20  # probabilities per SavedProbabilities call (see `attention`)
MIN_ROWS = 64  # fewer kept rows than this (and than the call has) gain less than the split costs


def _row_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Bytes of probabilities per query row: one for every key, in every batch item and head."""
    return q.shape[0] * q.shape[1] * k.shape[-2] * q.element_size()


def rows_to_keep(q: torch.Tensor, k: torch.Tensor, available_bytes: int) -> int:
    """How many of this call's query rows keep their probabilities, given `available_bytes` of the budget.

    Query rows are independent in attention, so a call that does not fit keeps a prefix of its rows (flash takes
    the rest). 0 where SavedProbabilities is not the faster way: no gradients, not on the CPU, or fp32 (see the
    module docstring)."""
    length_q = q.shape[2]
    if not (torch.is_grad_enabled() and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)):
        return 0
    rows = min(length_q, max(available_bytes, 0) // _row_bytes(q, k))
    return rows if rows >= min(length_q, MIN_ROWS) else 0


def attention(q, k, v, scale: float, rows: int) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale)·V with the probabilities of the first `rows` query rows kept, flash for the others.

    The kept rows go in blocks of at most BLOCK_BYTES of probabilities, each its own SavedProbabilities: blocks of
    one size reuse the heap's free holes from step to step (whole layers of 256 MB left RSS growing for several
    steps), and backward's dP buffer is one block's size, not the layer's."""
    if rows == 0:
        return F.scaled_dot_product_attention(q, k, v)
    per_block = max(1, BLOCK_BYTES // _row_bytes(q, k))
    parts = [SavedProbabilities.apply(q[:, :, i:min(i + per_block, rows)], k, v, scale)
             for i in range(0, rows, per_block)]
    if rows < q.shape[2]:
        parts.append(F.scaled_dot_product_attention(q[:, :, rows:], k, v))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class CpuTrainingAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 with SavedProbabilities where `rows_to_keep` says so, within `memory_bytes` per forward pass.

    The budget is spent in call order during a forward pass (`new_pass`, a pre-hook on the UNet, starts the count)
    and each decision is remembered per layer and shapes: a forward pass that gradient checkpointing repeats inside
    backward makes the same choices (non-reentrant checkpointing requires it), and later steps at the same shapes
    spend the same bytes. Handles the plain attention of SD's UNets (3-d hidden states, no mask, no extra norms, no
    residual); any other configuration goes to diffusers' processor unchanged.
    """

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_MB * 2**20):
        super().__init__()
        self.memory_bytes = memory_bytes
        self.spent = 0  # bytes of probabilities this forward pass keeps so far
        self.decided: dict[tuple, int] = {}  # (layer, query and key shapes, dtype, grad on) → kept rows

    def new_pass(self, *_) -> None:
        self.spent = 0

    def _attention(self, attn, q, k, v, scale: float) -> torch.Tensor:
        key = (id(attn), q.shape, k.shape, q.dtype, torch.is_grad_enabled())
        rows = self.decided.get(key)
        if rows is None:
            rows = self.decided[key] = rows_to_keep(q, k, self.memory_bytes - self.spent)
        self.spent += rows * _row_bytes(q, k)
        return attention(q, k, v, scale, rows)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        plain = (hidden_states.ndim == 3 and attention_mask is None and attn.spatial_norm is None
                 and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None and attn.norm_k is None
                 and not attn.residual_connection and attn.rescale_output_factor == 1.0 and not args and not kwargs)
        if not plain:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args,
                                    **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = self._attention(attn, q, k, v, head_dim ** -0.5)  # SDPA's default scale, as diffusers uses
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def use_cpu_training_attention(unet, memory_mb: int = DEFAULT_MEMORY_MB) -> CpuTrainingAttnProcessor:
    """Every attention layer of `unet` gets one shared CpuTrainingAttnProcessor with a budget of `memory_mb`
    (once: several runs on one UNet share it)."""
    installed = getattr(unet, "_cpu_training_attention", None)
    if installed is not None and installed.memory_bytes == memory_mb * 2**20:
        return installed
    processor = CpuTrainingAttnProcessor(memory_mb * 2**20)
    unet.set_attn_processor(processor)
    unet.register_forward_pre_hook(processor.new_pass)
    unet._cpu_training_attention = processor
    return processor
