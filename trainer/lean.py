"""Training-only forward paths that keep fewer activations for backward, with the same results.

1. The feed-forward.

Each transformer block of an SD UNet ends in a feed-forward: h = proj(x); a, g = h.chunk(2); y = out(a * gelu(g)),
with `proj` 8 and `a * gelu(g)` 4 times the block's width. Autograd keeps h, gelu(g) (for the product's backward)
and, because `out` carries a LoRA whose down-projection needs its input for its gradient, a * gelu(g) too:
16 widths per token, the largest activations of the UNet (176 of the 445 MB saved in one SD 1.5 forward at 256 px,
measured with saved-tensor hooks). A plain diffusers + PEFT loop with LoRA on the attention only keeps 12.

Here the product and `out` (its frozen Linear plus its LoRA) are one autograd function that keeps only h and the
rank-wide LoRA intermediate, and recomputes a * gelu(g) in backward (elementwise, a small cost next to the
matmuls): 8 widths instead of 16. The frozen base weight is never copied. Anything unusual (dropout, DoRA,
several or disabled adapters, merged weights, no grad) takes diffusers' own forward.

2. Frozen convolutions. Autograd keeps a convolution's input even when its weight is frozen, although the input's
gradient needs only the weight. In a ResNet block the inputs of conv1, conv2 and of the upsamplers' convs are SiLU
or interpolation outputs that nothing else keeps, so not keeping them frees them (33 of the 445 MB above).
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


class _FrozenConv(torch.autograd.Function):
    """F.conv2d with a frozen weight that keeps only the input's shape: its gradient needs the weight alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding,
                         dilation, groups)
        ctx.save_for_backward(weight)
        ctx.shape, ctx.x_dtype, ctx.dtype, ctx.conv = x.shape, x.dtype, dtype, (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight.to(ctx.dtype), grad_y.to(ctx.dtype), stride,
                                                padding, dilation, groups)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


def _frozen(layer: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in (layer.weight, layer.bias) if p is not None)


def _lean_conv_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad and _frozen(self)):
        return type(self).forward(self, x)
    return _FrozenConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _plain_adapter(layer: LoraLinear) -> str | None:
    """The one active vanilla LoRA adapter of `layer`, or None when the fused path would change the result."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (name not in layer.lora_A or name in getattr(layer, "lora_variant", {})
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_B[name].bias is not None
            or not isinstance(layer.get_base_layer(), torch.nn.Linear) or not _frozen(layer.get_base_layer())):
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


def lean_forwards(model: torch.nn.Module, feedforward: bool = True, convolution: bool = True) -> int:
    """Give every GEGLU feed-forward whose output Linear carries a LoRA, and every plain Conv2d, the lean forward
    (each checks at every call that it applies: frozen weight, grad enabled); returns how many modules."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module):  # already wrapped (by us, or by accelerate's hooks): leave it
            continue
        if (feedforward and isinstance(module, FeedForward) and len(module.net) == 3 and type(module.net[0]) is GEGLU
                and isinstance(module.net[1], torch.nn.Dropout) and isinstance(module.net[2], LoraLinear)):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
        elif (convolution and type(module) is torch.nn.Conv2d and module.padding_mode == "zeros"
              and isinstance(module.padding, tuple)):
            module.forward = types.MethodType(_lean_conv_forward, module)
            count += 1
    return count


def plain_forwards(model: torch.nn.Module) -> None:
    """Undo lean_forwards (the modules' own forward again)."""
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) in (_lean_forward, _lean_conv_forward):
            del module.forward
