"""The tensor-by-tensor .safetensors reader (trainer/weights.py) against safetensors' own writer and reader."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.weights import WeightsError, needs_cast, read_cast, read_header


@pytest.fixture
def mixed(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "unet.w": torch.randn(64, 33, generator=g),
        "unet.half": torch.randn(5, 7, generator=g).half(),
        "unet.bf": torch.randn(11, generator=g).bfloat16(),
        "unet.double": torch.randn(3, generator=g).double(),
        "vae.w": torch.randn(4, 4, 3, 3, generator=g),
        "ids": torch.arange(77).reshape(1, 77),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(9, dtype=torch.uint8),
        "empty": torch.empty(0, 8),
        "scalar": torch.tensor(0.18215),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "8"})
    return path, tensors


def test_reads_what_safetensors_reads(mixed):
    path, tensors = mixed
    state, metadata = read_cast(path, None)
    theirs = load_file(str(path))
    assert metadata == {"ss_network_dim": "8"} and set(state) == set(theirs) == set(tensors)
    for key, value in theirs.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape and torch.equal(state[key], value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_casts_floating_tensors_only_and_keeps_what_it_is_told(mixed, dtype):
    path, tensors = mixed
    state, _ = read_cast(path, dtype, keep=lambda name: name.startswith("vae."))
    for key, value in tensors.items():
        if key.startswith("vae.") or not value.is_floating_point():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        else:  # the same rounding as casting the full-precision tensor
            assert state[key].dtype == dtype and torch.equal(state[key], value.to(dtype)), key


def test_needs_cast_looks_at_floating_dtypes_only(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.arange(3)}, str(path))
    assert not needs_cast(path, torch.bfloat16)
    assert needs_cast(path, torch.float32)


def test_a_dtype_this_reader_does_not_know_is_left_to_safetensors(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}}).encode()
    path = tmp_path / "fp4.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(5))
    assert not needs_cast(path, torch.bfloat16)
    with pytest.raises(WeightsError, match="F4"):
        read_cast(path, torch.bfloat16)


def test_damaged_files_are_errors_naming_the_file(mixed, tmp_path):
    path, _ = mixed
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated") as err:
        read_cast(truncated, torch.bfloat16)
    assert str(truncated) in str(err.value)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights")
    with pytest.raises(WeightsError, match="not a .safetensors file") as err:
        read_header(text)
    assert str(text) in str(err.value)
