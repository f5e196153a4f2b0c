"""Attention for training in bf16/fp16 on the CPU: keep the probabilities instead of recomputing them.

torch's CPU flash attention recomputes the attention probabilities in backward (five matmuls in all), and its
backward costs 2-3× its forward in bf16. Attention as three plain ops (Q·Kᵀ, softmax, ·V) with the probabilities
saved costs four matmuls and a fused softmax backward, and its bf16 matmuls run at the CPU's bf16 speed where flash's
blocks do not. `scripts/benchmark_attention.py` (forward + backward, one thread, SD 1.5 shapes, 8 heads, the
trainer's allocator setting; ours / flash): bf16 cross-attention 0.42-0.55×, self-attention over 64-1024 tokens
0.46-0.64×, 4096 tokens (SD 1.5 at 512 px) 0.68× (its forward alone 0.70×).

The 4096-token layers still take flash: their probabilities are 256 MB per layer and stay until backward. Kept
(`MAX_SAVED_BYTES = 256 * 2**20`, softmax and its backward in place as below), they bring SD 1.5's bf16 step at
512 px to 11.5 s, 2.09× the forward pass (docs/benchmark-results/2026-11-28-sd15-cpu-keep-256mb-probabilities.json;
13.0 s and 2.41× with flash in this session's full run), but RSS during the steps to 5.16 GB, 1.29× the plain diffusers + PEFT loop's (whose peak, 5.25 GB, comes
from loading), and the +1.8 GB would put the text-encoder-training variant above it. Hence `MAX_SAVED_BYTES`.
In fp32 self-attention over 1024-4096 tokens is 1.1-1.8× slower, the rest gains 2-17%: flash is kept for fp32.

The rule, checked per call: CPU, gradients on, bf16/fp16 inputs, no mask, the probabilities at most
`MAX_SAVED_BYTES`. Anything else takes diffusers' own AttnProcessor2_0 (flash attention). Precision: outputs and
gradients within bf16's rounding of the exact ones (the probabilities are kept in bf16 as the matmul with V uses
them; about twice flash's error, which keeps them in fp32 inside the kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

MAX_SAVED_BYTES = 32 * 2**20  # per call: 1024² scores × 8 heads × 2 bytes is 16 MB (SD 1.5 at 256 px, level 0)


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


def keeps_probabilities(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether SavedProbabilities is the faster way for this call (see the module docstring)."""
    batch, heads, length_q, _ = q.shape
    return (torch.is_grad_enabled() and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and batch * heads * length_q * k.shape[-2] * q.element_size() <= MAX_SAVED_BYTES)


class CpuTrainingAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 with SavedProbabilities where `keeps_probabilities` says so.

    Handles the plain attention of SD's UNets (3-d hidden states, no mask, no extra norms, no residual); any other
    configuration goes to diffusers' processor unchanged.
    """

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
        if keeps_probabilities(q, k):
            out = SavedProbabilities.apply(q, k, v, head_dim ** -0.5)  # SDPA's default scale, as diffusers uses
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def use_cpu_training_attention(unet) -> None:
    """Every attention layer of `unet` gets CpuTrainingAttnProcessor (one shared, stateless instance)."""
    unet.set_attn_processor(CpuTrainingAttnProcessor())
