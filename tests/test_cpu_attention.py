"""cpu_attention.py: the saved-probabilities attention against finite differences, SDPA and an fp32 UNet."""
import copy

import pytest
import torch
import torch.nn.functional as F

from test_lean import _inputs, _step, _unet
from trainer import cpu_attention
from trainer.cpu_attention import SavedProbabilities, rows_to_keep, use_cpu_training_attention


def _qkv(dtype, lq=5, lk=7, heads=2, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for n in (lq, lk, lk)]


def test_backward_matches_finite_differences():
    q, k, v = _qkv(torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: SavedProbabilities.apply(q, k, v, 0.7), (q, k, v))


def test_forward_and_gradients_equal_sdpa_in_float64():
    q, k, v = _qkv(torch.float64, lq=9, lk=4, dim=8)
    grad = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    ours = SavedProbabilities.apply(q, k, v, 8 ** -0.5)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [77, 1024, 4096])
def test_in_place_softmax_equals_out_of_place(length):
    """SavedProbabilities runs softmax and its backward in place (one buffer for scores and probabilities, one for
    dP and dS): bit for bit what the out-of-place ops give, at SD's row lengths."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 16, 40, generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, length, 40, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(1, 2, 16, 40, generator=gen).bfloat16()

    def out_of_place(q, k, v, scale):
        return torch.matmul(torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1), v)

    ours = SavedProbabilities.apply(q, k, v, 40 ** -0.5)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = out_of_place(q, k, v, 40 ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert torch.equal(ours, ref)
    # autograd's softmax backward is the same fused kernel; the matmuls are the same calls in the same order
    for a, b in zip(ours_grads, ref_grads):
        assert torch.equal(a, b)


def test_which_calls_keep_probabilities():
    def shapes(lq, lk, dtype=torch.bfloat16, heads=8):
        return torch.empty(1, heads, lq, 40, dtype=dtype), torch.empty(1, heads, lk, 40, dtype=dtype)

    mb = 2**20
    assert rows_to_keep(*shapes(1024, 1024), 1024 * mb) == 1024  # SD 1.5 at 256 px: 16 MB of probabilities
    assert rows_to_keep(*shapes(4096, 77), 6 * mb) == 4096  # cross-attention at 512 px: 4.8 MB
    # 512 px self-attention: 64 KB per query row (8 heads × 4096 keys × 2 bytes); 100 MB keep 1600 rows
    assert rows_to_keep(*shapes(4096, 4096), 100 * mb) == 1600
    assert rows_to_keep(*shapes(4096, 4096), 63 * 64 * 1024) == 0  # under MIN_ROWS: not worth the split
    assert rows_to_keep(*shapes(32, 32), 32 * 8 * 32 * 2) == 32  # a call shorter than MIN_ROWS, kept whole
    assert rows_to_keep(*shapes(4096, 4096), -5) == 0  # budget overspent
    assert rows_to_keep(*shapes(64, 64, torch.float32), 1024 * mb) == 0  # fp32: flash is faster for long sequences
    with torch.no_grad():
        assert rows_to_keep(*shapes(64, 64), 1024 * mb) == 0  # nothing to keep for


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_every_unet_attention_takes_it_in_bf16_training_with_diffusers_results(monkeypatch, share):
    """The processor's wiring: in float64 (path forced for all query rows, or for the first half and flash for the
    rest), outputs and LoRA gradients equal diffusers' processor; under bf16 autocast every attention layer of the
    UNet takes the saved-probabilities path."""
    flash = _unet().double()
    ours = copy.deepcopy(flash)
    use_cpu_training_attention(ours)
    x, t, text, kwargs = _inputs(flash, "sd1")
    inputs = (x.double(), t, text.double(), kwargs)
    monkeypatch.setattr(cpu_attention, "rows_to_keep",
                        lambda q, k, available: int(q.shape[2] * share) if torch.is_grad_enabled() else 0)
    out_flash, grads_flash = _step(flash, inputs)
    out_ours, grads_ours = _step(ours, inputs)
    torch.testing.assert_close(out_ours, out_flash, rtol=1e-6, atol=1e-6)  # _step returns float32 outputs
    for a, b in zip(grads_ours, grads_flash):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    monkeypatch.undo()
    calls = []
    apply = SavedProbabilities.apply
    monkeypatch.setattr(cpu_attention.SavedProbabilities, "apply", lambda *a: calls.append(1) or apply(*a))
    ours = copy.deepcopy(flash).float()
    use_cpu_training_attention(ours)
    _step(ours, _inputs(ours, "sd1"), bf16=True)
    assert len(calls) == sum(1 for n, _ in ours.named_modules() if n.endswith((".attn1", ".attn2")))


def test_budget_bounds_the_probabilities_kept_in_a_step_and_checkpointing_repeats_the_choices(monkeypatch):
    """A budget of half what the tiny UNet's attention would keep: the bytes kept per forward stay within it, some
    call keeps only part of its rows, every step makes the same choices, and with gradient checkpointing (whose
    recomputed forward must save what the first one saved) the results equal the run without it."""
    monkeypatch.setattr(cpu_attention, "MIN_ROWS", 8)  # the tiny UNet's calls have 1-64 query rows
    unet = _unet().float()
    inputs = _inputs(unet, "sd1")
    full = copy.deepcopy(unet)
    everything = use_cpu_training_attention(full, memory_mb=1024)
    _step(full, inputs, bf16=True)
    full_rows = list(everything.decided.values())
    assert all(full_rows) and everything.spent > 0

    ours = copy.deepcopy(unet)
    processor = use_cpu_training_attention(ours)
    processor.memory_bytes = everything.spent // 2  # memory_mb counts MB; the tiny model keeps a few hundred KB
    out_plain, grads_plain = _step(ours, inputs, bf16=True)
    rows, spent = list(processor.decided.values()), processor.spent
    assert everything.spent // 4 < spent <= processor.memory_bytes
    assert any(0 < r < f for r, f in zip(rows, full_rows)) and 0 in rows  # a partial call, and flash after it
    _step(ours, inputs, bf16=True)
    assert list(processor.decided.values()) == rows and processor.spent == spent

    ours.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = _step(ours, inputs, bf16=True)
    assert list(processor.decided.values()) == rows  # the recomputation inside backward chose as the forward did
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("context", [None, 77])
def test_attention_layer_in_bf16_is_as_close_to_exact_as_flash(context):
    """One SD-sized attention layer (self- or cross-attention) under bf16 autocast, ours and diffusers' flash
    attention, each against the same layer in float64: ours may round at most about twice as much."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    layer = Attention(query_dim=320, cross_attention_dim=768 if context else None, heads=8, dim_head=40)
    x = torch.randn(1, 256, 320)
    ctx = torch.randn(1, context, 768) if context else None
    grad = torch.randn(1, 256, 320)

    def run(model, dtype, bf16):
        model = copy.deepcopy(model).to(dtype)
        inp = x.to(dtype).clone().requires_grad_()  # a fresh leaf: .to(float32) would return x itself
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inp, None if ctx is None else ctx.to(dtype))
        out.backward(grad.to(out.dtype))
        return [out.double(), inp.grad.double()] + [p.grad.double() for p in model.parameters()]

    exact = run(layer, torch.float64, False)
    flash = run(layer, torch.float32, True)
    ours_layer = copy.deepcopy(layer)
    ours_layer.set_processor(cpu_attention.CpuTrainingAttnProcessor())
    ours = run(ours_layer, torch.float32, True)
    for a, b, e in zip(ours, flash, exact):
        err_ours, err_flash = ((a - e).norm() / e.norm()).item(), ((b - e).norm() / e.norm()).item()
        assert err_ours < max(2.5 * err_flash, 1e-3) and err_ours < 2e-2, (err_ours, err_flash)


@pytest.mark.parametrize("bf16", [False, True])
def test_other_calls_are_diffusers_own_attention(bf16):
    """fp32 training, and any forward without gradients (sampling), give exactly diffusers' results."""
    flash = _unet()
    ours = copy.deepcopy(flash)
    use_cpu_training_attention(ours)
    x, t, text, kwargs = _inputs(flash, "sd1")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert torch.equal(ours(x, t, text).sample, flash(x, t, text).sample)
    if not bf16:
        out_flash, grads_flash = _step(flash, (x, t, text, kwargs))
        out_ours, grads_ours = _step(ours, (x, t, text, kwargs))
        assert torch.equal(out_ours, out_flash)
        assert all(torch.equal(a, b) for a, b in zip(grads_ours, grads_flash))
