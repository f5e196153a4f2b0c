"""A feed-forward that keeps fewer activations for backward while training, with the same results.

Each transformer block of an SD UNet ends in a feed-forward: h = proj(x); a, g = h.chunk(2); y = out(a * gelu(g)),
with `proj` 8 and `a * gelu(g)` 4 times the block's width. Autograd keeps h, gelu(g) (for the product's backward)
and, because `out` carries a LoRA whose down-projection needs its input for its gradient, a * gelu(g) too:
16 widths per token, the largest activations of the UNet (176 of the 445 MB saved in one SD 1.5 forward at 256 px,
measured with saved-tensor hooks). A plain diffusers + PEFT loop with LoRA on the attention only keeps 12.

Here the product and `out` (its frozen Linear plus its LoRA) are one autograd function that keeps only h and the
rank-wide LoRA intermediate, and recomputes a * gelu(g) in backward (elementwise, a small cost next to the
matmuls): 8 widths instead of 16. The frozen base weight is never copied. Anything unusual (dropout, DoRA,
several or disabled adapters, merged weights, no grad) takes diffusers' own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward
from peft.tuners.lora.layer import Linear as LoraLinear


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Under autocast the matmuls run in its dtype (as F.linear would); otherwise in the activations' own.
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _GatedLoraOut(torch.autograd.Function):
    """y = out(a * gelu(g)) + scale * up(down(a * gelu(g))) from h = [a, g]; saves h, not the products."""

    @staticmethod
    def forward(ctx, h, weight, bias, down, up, scale: float):
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):  # explicit casts: the same ones in backward
            a, g = h.to(dtype).chunk(2, dim=-1)
            p = a * F.gelu(g)
            mid = F.linear(p, down.to(dtype))
            y = F.linear(p, weight.to(dtype), None if bias is None else bias.to(dtype))
            y = y + F.linear(mid, up.to(dtype)) * scale
        ctx.save_for_backward(h, weight, down, up, mid)
        ctx.dtype, ctx.scale = dtype, scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, down, up, mid = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        need_h, need_down, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_h = grad_down = grad_up = None
        with torch.autocast(h.device.type, enabled=False):
            a, g = h.to(dtype).chunk(2, dim=-1)
            gate = F.gelu(g)
            gy = grad_y.to(dtype)
            grad_mid = (gy @ up.to(dtype)) * scale
            if need_down:
                grad_down = (_flat(grad_mid).t() @ _flat(a * gate)).to(down.dtype)
            if need_up:
                grad_up = (_flat(gy).t() @ _flat(mid) * scale).to(up.dtype)
            if need_h:
                grad_p = gy @ weight.to(dtype) + grad_mid @ down.to(dtype)
                grad_g = torch.ops.aten.gelu_backward(grad_p * a, g)
                grad_h = torch.cat([grad_p * gate, grad_g], dim=-1).to(h.dtype)
        return grad_h, None, None, grad_down, grad_up, None


def _plain_adapter(layer: LoraLinear) -> str | None:
    """The one active vanilla LoRA adapter of `layer`, or None when the fused path would change the result."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (name not in layer.lora_A or name in getattr(layer, "lora_variant", {})
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_B[name].bias is not None
            or not isinstance(layer.get_base_layer(), torch.nn.Linear)):
        return None
    return name


def _lean_forward(self: FeedForward, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    geglu, dropout, out = self.net
    adapter = _plain_adapter(out) if torch.is_grad_enabled() else None
    if adapter is None or (dropout.training and dropout.p > 0):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    base = out.get_base_layer()
    return _GatedLoraOut.apply(geglu.proj(hidden_states), base.weight, base.bias, out.lora_A[adapter].weight,
                               out.lora_B[adapter].weight, out.scaling[adapter])


def lean_feedforward(model: torch.nn.Module) -> int:
    """Give every GEGLU feed-forward whose output Linear carries a LoRA the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if (isinstance(module, FeedForward) and len(module.net) == 3 and type(module.net[0]) is GEGLU
                and isinstance(module.net[1], torch.nn.Dropout) and isinstance(module.net[2], LoraLinear)):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count


def plain_feedforward(model: torch.nn.Module) -> None:
    """Undo lean_feedforward (diffusers' forward again)."""
    for module in model.modules():
        if isinstance(module, FeedForward) and "forward" in vars(module):
            del module.forward
