"""Training-only forward paths: fewer activations kept for backward, LoRA's products faster; the same results.

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

3. LoRA's thin products. A LoRA Linear adds up(down(x)) * scale, products with one side only `rank` wide. Autograd
runs their backward in the orientation of the forward: grad(up) = gᵀ·mid, an (out × tokens)·(tokens × rank)
product with a transposed left side, which the CPU's BLAS runs at a tenth of its speed (43 ms against 5 ms for the
same product computed as (midᵀ·g)ᵀ at 4096 tokens × 2560 outputs, fp32). `_LoraLinear` is the base Linear plus its
LoRA in one autograd function that forms every thin product in its fast orientation, folds the scale into `up` and
adds the LoRA term in place: the same values, and it keeps what PEFT's path keeps (the input and the rank-wide middle).
`_LoraConv1x1` does the same for the 1x1 convolutions SD 1.x uses as proj_in / proj_out, whose LoRA PEFT runs as
two convolutions. `scripts/bench/lora_layers.py` times both against PEFT per SD 1.5 layer shape: what the LoRA
adds to a 512 px step, 1.17 → 0.47 s in fp32 and 0.44 → 0.32 s in bf16 (layers over 77-256 tokens lose up to 0.8 ms
each to the autograd function's own overhead; the large ones gain 5-50 ms).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Linear as LoraLinear


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Under autocast the matmuls run in its dtype (as F.linear would); otherwise in the activations' own.
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _thin_grads(grad_y: torch.Tensor, x: torch.Tensor, mid_t: torch.Tensor, up_scaled: torch.Tensor,
                need_down: bool, need_up: bool, scale: float):
    """For y = x·downᵀ·up_scaledᵀ (2-D, mid_t = down·xᵀ): the middle's gradient (rank × tokens) and the gradients
    of down and up, each product in the orientation the CPU's BLAS runs fast (see 3. above)."""
    grad_mid_t = up_scaled.t() @ grad_y.t()
    grad_down = grad_mid_t @ x if need_down else None
    grad_up = (mid_t @ grad_y).t() * scale if need_up else None
    return grad_mid_t, grad_down, grad_up


def _linear_with_lora(x, weight, bias, down, up, scale: float, dtype: torch.dtype):
    """base(x) + scale · up(down(x)) for 2-D x already in `dtype`, and the middle (rank × tokens) backward needs."""
    y = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    mid_t = down.to(dtype) @ x.t()
    return y.addmm_(mid_t.t(), (up * scale).to(dtype).t()), mid_t


def _input_grad(grad_y, weight, grad_mid_t, down, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of _linear_with_lora's input: through the frozen base and the LoRA's down-projection."""
    return (grad_y @ weight.to(dtype)).addmm_(grad_mid_t.t(), down.to(dtype))


class _LoraLinear(torch.autograd.Function):
    """y = base(x) + scale * up(down(x)) for a frozen base Linear; saves x and the rank-wide middle, as PEFT does."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = _flat(x).to(dtype)
            y, mid_t = _linear_with_lora(x2, weight, bias, down, up, scale, dtype)
        # x itself when no cast was needed (it may be kept anyway: q, k and v share theirs), else the cast.
        ctx.save_for_backward(x if x.dtype == dtype else x2, weight, down, up, mid_t)
        ctx.shape, ctx.x_dtype, ctx.dtype, ctx.scale = x.shape, x.dtype, dtype, scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, down, up, mid_t = ctx.saved_tensors
        dtype = ctx.dtype
        need_x, need_down, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        with torch.autocast(grad_y.device.type, enabled=False):
            gy = _flat(grad_y).to(dtype)
            grad_mid_t, grad_down, grad_up = _thin_grads(gy, _flat(x).to(dtype), mid_t, (up * ctx.scale).to(dtype),
                                                         need_down, need_up, ctx.scale)
            grad_x = None
            if need_x:
                grad_x = _input_grad(gy, weight, grad_mid_t, down, dtype).view(ctx.shape).to(ctx.x_dtype)
        return (grad_x, None, None, None if grad_down is None else grad_down.to(down.dtype),
                None if grad_up is None else grad_up.to(up.dtype), None)


class _LoraConv1x1(torch.autograd.Function):
    """y = conv(x) + scale * up(down(x)) for a frozen 1x1 convolution, the LoRA on (channels × pixels) matrices."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            y = F.conv2d(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
            n, c = x.shape[:2]
            down2 = down.reshape(down.shape[0], c).to(dtype)
            mid = torch.bmm(down2.expand(n, *down2.shape), xc.reshape(n, c, -1))  # (n, rank, pixels)
            up2 = (up.reshape(up.shape[0], -1) * scale).to(dtype)
            y.view(n, y.shape[1], -1).baddbmm_(up2.expand(n, *up2.shape), mid)
        ctx.save_for_backward(xc, weight, down, up, mid)
        ctx.x_dtype, ctx.dtype, ctx.scale = x.dtype, dtype, scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, weight, down, up, mid = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        need_x, need_down, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        with torch.autocast(grad_y.device.type, enabled=False):
            n, c = xc.shape[:2]
            gy = grad_y.to(dtype)
            up2 = (up.reshape(up.shape[0], -1) * scale).to(dtype)
            grads = [_thin_grads(gy[i].reshape(up2.shape[0], -1).t(), xc[i].reshape(c, -1).t(), mid[i], up2,
                                 need_down, need_up, scale) for i in range(n)]  # per item: (pixels × channels)
            grad_x = grad_down = grad_up = None
            if need_down:
                grad_down = sum(g[1] for g in grads).reshape(down.shape).to(down.dtype)
            if need_up:
                grad_up = sum(g[2] for g in grads).reshape(up.shape).to(up.dtype)
            if need_x:
                grad_x = torch.nn.grad.conv2d_input(xc.shape, weight.to(dtype), gy).contiguous()
                down_t = down.reshape(down.shape[0], c).to(dtype).t()
                grad_mid = torch.stack([g[0] for g in grads])
                grad_x.view(n, c, -1).baddbmm_(down_t.expand(n, *down_t.shape), grad_mid)
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, None, grad_down, grad_up, None


class _GatedLoraOut(torch.autograd.Function):
    """y = out(a * gelu(g)) + scale * up(down(a * gelu(g))) from h = [a, g]; saves h, not the products."""

    @staticmethod
    def forward(ctx, h, weight, bias, down, up, scale: float):
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):  # explicit casts: the same ones in backward
            a, g = _flat(h).to(dtype).chunk(2, dim=-1)
            y, mid_t = _linear_with_lora(a * F.gelu(g), weight, bias, down, up, scale, dtype)
        ctx.save_for_backward(h, weight, down, up, mid_t)
        ctx.dtype, ctx.scale = dtype, scale
        return y.view(*h.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, down, up, mid_t = ctx.saved_tensors
        dtype = ctx.dtype
        need_h, need_down, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_h = None
        with torch.autocast(h.device.type, enabled=False):
            a, g = _flat(h).to(dtype).chunk(2, dim=-1)
            gate = F.gelu(g)
            gy = _flat(grad_y).to(dtype)
            grad_mid_t, grad_down, grad_up = _thin_grads(gy, a * gate if need_down else None, mid_t,
                                                         (up * ctx.scale).to(dtype), need_down, need_up, ctx.scale)
            if need_h:
                grad_p = _input_grad(gy, weight, grad_mid_t, down, dtype)
                # [grad a | grad g] written into their halves of one buffer, not concatenated afterwards
                grad_h = torch.empty(*a.shape[:-1], 2 * a.shape[-1], dtype=dtype, device=a.device)
                grad_a, grad_g = grad_h.chunk(2, dim=-1)
                torch.mul(grad_p, gate, out=grad_a)
                torch.ops.aten.gelu_backward.grad_input(grad_p.mul_(a), g, grad_input=grad_g)
                grad_h = grad_h.view(h.shape).to(h.dtype)
        return (grad_h, None, None, None if grad_down is None else grad_down.to(down.dtype),
                None if grad_up is None else grad_up.to(up.dtype), None)


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


def _is_1x1(conv: torch.nn.Module) -> bool:
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


def _plain_adapter(layer: LoraLinear | LoraConv2d) -> str | None:
    """The one active vanilla LoRA adapter of `layer`, or None when the fused path would change the result."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    if (name not in layer.lora_A or name in getattr(layer, "lora_variant", {})
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_B[name].bias is not None
            or not _frozen(base)):
        return None
    if isinstance(layer, LoraLinear):
        return name if isinstance(base, torch.nn.Linear) else None
    return name if _is_1x1(base) and _is_1x1(layer.lora_A[name]) else None


def _lean_forward(self: FeedForward, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    geglu, dropout, out = self.net
    adapter = _plain_adapter(out) if torch.is_grad_enabled() else None
    if adapter is None or (dropout.training and dropout.p > 0):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    base = out.get_base_layer()
    return _GatedLoraOut.apply(geglu.proj(hidden_states), base.weight, base.bias, out.lora_A[adapter].weight,
                               out.lora_B[adapter].weight, out.scaling[adapter])


def _lean_lora_forward(self: LoraLinear | LoraConv2d, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _plain_adapter(self) if torch.is_grad_enabled() and not args and not kwargs else None
    base = self.get_base_layer()
    # Without autocast PEFT runs the LoRA in its weights' dtype and the base in its own: fuse only when they agree.
    same_dtype = torch.is_autocast_enabled(x.device.type) or x.dtype == base.weight.dtype == (
        None if adapter is None else self.lora_A[adapter].weight.dtype)
    image = x.dim() == 4 and x.is_contiguous()  # what _LoraConv1x1 takes (NCHW)
    if adapter is None or not same_dtype or (isinstance(self, LoraConv2d) and not image):
        return type(self).forward(self, x, *args, **kwargs)
    fused = _LoraLinear if isinstance(self, LoraLinear) else _LoraConv1x1
    return fused.apply(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                       self.scaling[adapter])


def lean_forwards(model: torch.nn.Module, feedforward: bool = True, convolution: bool = True,
                  lora: bool = True) -> int:
    """Give every GEGLU feed-forward whose output Linear carries a LoRA, every plain Conv2d and every LoRA Linear or
    Conv2d the lean forward (each checks at every call that it applies: frozen base, grad enabled, one plain adapter);
    returns how many modules."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module):  # already wrapped (by us, or by accelerate's hooks): leave it
            continue
        if lora and type(module) in (LoraLinear, LoraConv2d):
            module.forward = types.MethodType(_lean_lora_forward, module)
            count += 1
        elif (feedforward and isinstance(module, FeedForward) and len(module.net) == 3 and type(module.net[0]) is GEGLU
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
    ours = (_lean_forward, _lean_conv_forward, _lean_lora_forward)
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) in ours:
            del module.forward
