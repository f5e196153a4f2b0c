"""The lean feed-forward: same outputs and LoRA gradients as diffusers + PEFT's own forward, fewer saved bytes."""
import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Linear as LoraLinear

import tiny_models
from trainer.config import NetworkConfig
from trainer.lean import lean_forwards, plain_forwards
from trainer.network import add_lora, lora_parameters


def _unet(family: str = "sd1", dropout: float = 0.0):
    torch.manual_seed(0)
    unet = tiny_models.BUILDERS[family]()["unet"]
    add_lora(unet, [], NetworkConfig(rank=4, alpha=2.0, dropout=dropout, train_text_encoder=False))
    gen = torch.Generator().manual_seed(1)
    for p in lora_parameters(unet):  # non-zero up weights, as after some training
        p.data = torch.randn(p.shape, generator=gen) * 0.1
    return unet.train()


def _inputs(unet, family: str):
    gen = torch.Generator().manual_seed(2)
    side = unet.config.sample_size
    x = torch.randn(2, 4, side, side, generator=gen)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    return x, torch.tensor([10, 700]), text, kwargs


def _step(unet, inputs, bf16: bool = False):
    x, t, text, kwargs = inputs
    unet.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = unet(x, t, text, **kwargs).sample
    out.float().pow(2).mean().backward()
    return out.detach().float(), [p.grad.clone() for p in lora_parameters(unet)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_output_and_gradients_as_diffusers_forward(family):
    # In float64: the fused products sum in another order than PEFT's (and fold the scale into `up`), so they
    # agree to rounding, which float64 makes small enough for a tolerance that any wrong term would exceed.
    plain = _unet(family).double()
    lean = copy.deepcopy(plain)
    n_ff = sum(1 for n, _ in lean.named_modules() if n.endswith(".ff"))
    n_conv = sum(1 for m in lean.modules() if type(m) is torch.nn.Conv2d)
    n_lora = sum(1 for m in lean.modules() if type(m) in (LoraLinear, LoraConv2d))
    assert n_lora > 2 * n_ff
    assert lean_forwards(lean) == n_ff + n_conv + n_lora
    x, t, text, kwargs = _inputs(plain, family)
    if kwargs:
        kwargs = {"added_cond_kwargs": {k: v.double() for k, v in kwargs["added_cond_kwargs"].items()}}
    inputs = (x.double(), t, text.double(), kwargs)
    out_plain, grads_plain = _step(plain, inputs)
    out_lean, grads_lean = _step(lean, inputs)
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-10, atol=1e-12)
    for g_lean, g_plain in zip(grads_lean, grads_plain):
        torch.testing.assert_close(g_lean, g_plain, rtol=1e-9, atol=1e-12)


def _relative_error(values: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    flat = torch.cat([v.double().flatten() for v in values])
    exact = torch.cat([e.double().flatten() for e in exact])
    return ((flat - exact).norm() / exact.norm()).item()


def test_under_bf16_autocast_as_accurate_as_diffusers_forward():
    """bf16 rounds the fused products at other points than PEFT's path, so the two differ by bf16 rounding; both are
    measured against the same model in float64, and ours may not be less accurate than diffusers + PEFT's."""
    plain = _unet("sdxl")  # (the tiny SD 1.x model's LoRA gradients are bf16 noise on either path: no measure)
    lean = copy.deepcopy(plain)
    lean_forwards(lean)
    exact = copy.deepcopy(plain).double()
    x, t, text, kwargs = _inputs(plain, "sdxl")
    out_exact, grads_exact = _step(exact, (x.double(), t, text.double(), {
        "added_cond_kwargs": {k: v.double() for k, v in kwargs["added_cond_kwargs"].items()}}))
    out_plain, grads_plain = _step(plain, (x, t, text, kwargs), bf16=True)
    out_lean, grads_lean = _step(lean, (x, t, text, kwargs), bf16=True)
    for ours, theirs, exact_values in ((out_lean, out_plain, out_exact), (grads_lean, grads_plain, grads_exact)):
        ours, theirs, exact_values = ([v] if torch.is_tensor(v) else v for v in (ours, theirs, exact_values))
        error, reference_error = _relative_error(ours, exact_values), _relative_error(theirs, exact_values)
        assert 0 < reference_error < 0.1  # bf16 is measurably inexact, and still meaningful
        assert error < 1.2 * reference_error


@pytest.mark.parametrize("kind, shape, out", [("linear", (2, 1024, 320), 320), ("linear", (2, 256, 320), 2560),
                                              ("conv", (2, 320, 32, 32), 320)])
def test_lora_layer_at_sd_width_as_accurate_in_bf16(kind, shape, out):
    """One LoRA Linear / 1x1 Conv2d at SD 1.5's widths as the trainer runs it in bf16 (frozen base in bf16, LoRA
    in fp32, autocast): output and every gradient as close to float64 as PEFT's own forward gets."""
    torch.manual_seed(0)
    width = shape[1] if kind == "conv" else shape[-1]
    base = torch.nn.Conv2d(width, out, 1) if kind == "conv" else torch.nn.Linear(width, out)
    layer = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=4, target_modules=["0"]), torch.nn.Sequential(base))
    layer.requires_grad_(False)
    lora = [layer[0].lora_A["default"].weight, layer[0].lora_B["default"].weight]
    for p in lora:
        p.data = torch.randn(p.shape) * 0.1
    x = torch.randn(shape)
    grad = torch.randn(layer(x).shape)

    def run(model, dtype, bf16, lean=False):
        model = copy.deepcopy(model).to(dtype)
        params = [model[0].lora_A["default"].weight, model[0].lora_B["default"].weight]
        for p in params:
            p.data = p.data.to(torch.float64 if dtype == torch.float64 else torch.float32)
            p.requires_grad_(True)
        if lean:
            # The LoRA layer; for a conv also the three plain Conv2d inside it (base, down, up).
            assert lean_forwards(model) == (4 if kind == "conv" else 1)
        inp = x.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(inp)
        assert ("_Lora" in type(y.grad_fn).__name__) == lean  # the fused function ran (or PEFT's path did)
        y.backward(grad.to(y.dtype))
        return [y.detach(), inp.grad] + [p.grad for p in params]

    exact = run(layer, torch.float64, False)
    theirs = run(layer, torch.bfloat16, True)
    ours = run(layer, torch.bfloat16, True, lean=True)
    for mine, peft_value, exact_value in zip(ours, theirs, exact):
        assert _relative_error([mine], [exact_value]) < 1.2 * _relative_error([peft_value], [exact_value])


def _saved_bytes(unet, inputs) -> int:
    """Bytes autograd keeps for backward, each storage counted once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x, t, text, kwargs = inputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, text, **kwargs)
    return sum(seen.values())


def _inputs_seen(model, inputs, names) -> dict[str, torch.Tensor]:
    """Each named module's input in one forward, through forward hooks (independent of lean.py)."""
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0])  # returns None: the output stays as it is
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in model.named_modules() if name in names]
    model(*inputs[:3], **inputs[3])
    for h in hooks:
        h.remove()
    return seen


def test_feedforward_keeps_eight_fewer_widths():
    plain = _unet()
    lean = copy.deepcopy(plain)
    lean_forwards(lean, convolution=False)
    inputs = _inputs(plain, "sd1")
    # Each feed-forward no longer keeps gelu(g) nor the product: 2 tensors of 4x its width, per token.
    ffs = {name: m for name, m in plain.named_modules() if name.endswith(".ff")}
    seen = _inputs_seen(plain, inputs, ffs)
    expected = sum(2 * seen[name].shape[:-1].numel() * ffs[name].net[2].in_features * 4 for name in ffs)
    assert expected > 0
    assert _saved_bytes(plain, inputs) - _saved_bytes(lean, inputs) == expected


def test_frozen_convolutions_keep_no_input():
    plain = _unet()
    lean = copy.deepcopy(plain)
    lean_forwards(lean, feedforward=False)
    inputs = _inputs(plain, "sd1")
    # The inputs only a convolution keeps for backward: a ResNet's conv1 / conv2 (SiLU outputs), the up- and
    # downsamplers' convs and conv_out. (GroupNorm keeps a shortcut's input; LoRA's down-projection a proj_in's.)
    # Those before the first LoRA need no gradient and were never kept. The downsamplers' inputs stay alive as
    # skip connections, so not keeping them frees nothing; the others are freed.
    names = {n for n, m in plain.named_modules() if type(m) is torch.nn.Conv2d
             and (n.endswith((".conv1", ".conv2")) or "samplers." in n or n == "conv_out")}
    seen = _inputs_seen(plain, inputs, names)
    assert len(seen) == len(names) > 10
    expected = sum(t.numel() * t.element_size() for t in seen.values() if t.requires_grad)
    assert _saved_bytes(plain, inputs) - _saved_bytes(lean, inputs) == expected


def test_falls_back_to_diffusers_forward_when_fusing_would_differ():
    unet = _unet(dropout=0.5)  # LoRA dropout: the fused path does not apply it
    reference = copy.deepcopy(unet)
    lean_forwards(unet)
    inputs = _inputs(unet, "sd1")
    torch.manual_seed(5)
    out, grads = _step(unet, inputs)
    torch.manual_seed(5)
    out_ref, grads_ref = _step(reference, inputs)
    assert torch.equal(out, out_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    # No grad (sampling during training) and after plain_forwards: diffusers' forward, bit for bit.
    unet = _unet()
    reference = copy.deepcopy(unet)
    lean_forwards(unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs[:3]).sample, reference(*inputs[:3]).sample)
    plain_forwards(unet)
    assert not any("forward" in vars(m) for m in unet.modules())
