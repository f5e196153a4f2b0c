"""The lean feed-forward: same outputs and LoRA gradients as diffusers + PEFT's own forward, fewer saved bytes."""
import copy

import pytest
import torch

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
    plain = _unet(family)
    lean = copy.deepcopy(plain)
    n_ff = sum(1 for n, _ in lean.named_modules() if n.endswith(".ff"))
    n_conv = sum(1 for m in lean.modules() if type(m) is torch.nn.Conv2d)
    assert lean_forwards(lean) == n_ff + n_conv
    inputs = _inputs(plain, family)
    out_plain, grads_plain = _step(plain, inputs)
    out_lean, grads_lean = _step(lean, inputs)
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-5, atol=1e-6)
    for g_lean, g_plain in zip(grads_lean, grads_plain):
        torch.testing.assert_close(g_lean, g_plain, rtol=1e-4, atol=1e-7)


def test_same_under_bf16_autocast_as_diffusers_forward():
    plain = _unet()
    lean = copy.deepcopy(plain)
    lean_forwards(lean)
    inputs = _inputs(plain, "sd1")
    out_plain, grads_plain = _step(plain, inputs, bf16=True)
    out_lean, grads_lean = _step(lean, inputs, bf16=True)
    # bf16 rounds at different points of the same sums: compare at bf16's precision, and the gradients'
    # direction (what the optimiser follows) tightly.
    torch.testing.assert_close(out_lean, out_plain, rtol=0.05, atol=0.02)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads_lean]),
                                                   torch.cat([g.flatten() for g in grads_plain]), dim=0)
    assert cosine > 0.999


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
