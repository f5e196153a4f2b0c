"""The atomic writes: the old file survives any failure, and no temporary file is left beside it."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from trainer import atomic
from trainer.lora_file import read_lora, save_lora


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "captions" / "a.txt"
    atomic.write_text(path, "old caption\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("half of the new capt")
            raise RuntimeError("disk full")
    assert path.read_text() == "old caption\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "x.bin"
    atomic.write_bytes(path, b"one")
    atomic.write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_any_writer_can_write_through_a_temporary_path(tmp_path):
    path = tmp_path / "image.png"
    with atomic.atomic_path(path) as tmp:
        Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp, format="PNG")
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)


def test_save_lora_failing_midway_keeps_the_previous_export(tmp_path, monkeypatch):
    path = tmp_path / "style.safetensors"
    save_lora(path, {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, {"ss_network_dim": "2"})

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_lora(path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, {"ss_network_dim": "2"})
    tensors, meta = read_lora(path)
    assert torch.equal(tensors["lora_unet_x.lora_down.weight"], torch.ones(2, 2))
    assert os.listdir(tmp_path) == ["style.safetensors"]
