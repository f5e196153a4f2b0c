"""The latent cache: a warm cache never calls the encoder; any change in what the pixels depend on is a miss."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from test_data_corpus import pattern
from trainer.config import DataConfig
from trainer.data import LatentCache, latent_key, load_dataset


class FakeVAE:
    """Counts encodes; the 'latent' is an 8× average-pool of the pixels, so a cached value can be checked."""

    identity = "fake-vae-1"

    def __init__(self):
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.avg_pool2d(pixels[None], 8)[0]


def one_epoch(ds, cache: LatentCache, vae: FakeVAE, identity: str | None = None) -> dict[str, torch.Tensor]:
    """What the training loop does: key from the record and the crop known before decoding; pixels only on a miss."""
    out = {}
    for batch in ds.epoch_batches(0, 2):
        for draw in batch:
            key = latent_key(ds.images[draw.image], draw.flip, ds.crop_top_left(draw), identity or vae.identity)
            out[key] = cache.get_or_encode(key, lambda: vae.encode(ds.load_pixels(draw)[0]))
    return out


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for k, size in enumerate([(64, 64), (64, 64), (96, 32)]):
        pattern(*size, k).save(root / f"{k}.png")
    return root


def load(folder, **cfg):
    return load_dataset(DataConfig(dataset=str(folder), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                   bucket_step=32, **cfg), 0)


def test_warm_cache_skips_encoding(folder, tmp_path):
    ds, cache, vae = load(folder, flip=True), LatentCache(tmp_path / "cache"), FakeVAE()
    cold = one_epoch(ds, cache, vae)
    assert vae.calls == len(cold)  # one encode per distinct (image, flip)
    assert len(cold) <= 2 * len(ds.images)
    vae2 = FakeVAE()
    warm = one_epoch(load(folder, flip=True), cache, vae2)  # a new run over the same files
    assert vae2.calls == 0 and warm.keys() == cold.keys()
    for key, latent in warm.items():
        assert torch.equal(latent, cold[key])
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*"))


def test_each_ingredient_of_the_key_invalidates(folder, tmp_path):
    ds = load(folder)
    record = ds.images[0]
    base = latent_key(record, False, (0, 0), "vae-a")
    variants = [
        latent_key(dataclasses.replace(record, content_hash="0" * 64), False, (0, 0), "vae-a"),
        latent_key(dataclasses.replace(record, bucket=(96, 32)), False, (0, 0), "vae-a"),
        latent_key(dataclasses.replace(record, background="#000000"), False, (0, 0), "vae-a"),
        latent_key(record, True, (0, 0), "vae-a"),
        latent_key(record, False, (0, 8), "vae-a"),
        latent_key(record, False, (0, 0), "vae-b"),
    ]
    assert len({base, *variants}) == 7
    assert latent_key(dataclasses.replace(record, caption="other words"), False, (0, 0), "vae-a") == base


def test_changed_image_or_vae_is_a_miss(folder, tmp_path):
    cache, vae = LatentCache(tmp_path / "cache"), FakeVAE()
    one_epoch(load(folder), cache, vae)
    first = vae.calls
    pattern(64, 64, 99).save(folder / "0.png")  # the user edits one picture
    vae.calls = 0
    one_epoch(load(folder), cache, vae)
    assert vae.calls == 1  # only the changed file is encoded again
    vae.calls = 0
    one_epoch(load(folder), cache, vae, identity="another-vae")
    assert vae.calls == first  # a different VAE invalidates everything
    vae.calls = 0
    Image.open(folder / "2.png").resize((64, 64)).save(folder / "2.png")  # new size: new bucket and content
    one_epoch(load(folder), cache, vae)
    assert vae.calls == 1


def test_damaged_entry_is_a_miss_and_put_is_atomic(tmp_path):
    cache = LatentCache(tmp_path / "c")
    latent = torch.randn(4, 8, 8)
    cache.put("k", latent)
    assert torch.equal(cache.get("k"), latent) and cache.get("other") is None
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:20])  # truncated by hand, or a full disk
    assert cache.get("k") is None
    calls = []
    again = cache.get_or_encode("k", lambda: calls.append(1) or latent * 2)
    assert calls == [1] and torch.equal(cache.get("k"), again)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k.safetensors"]
