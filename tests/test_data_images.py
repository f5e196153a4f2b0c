"""Decoding: orientation, transparency, odd pixel modes, the bomb guard; and the pixels the loop gets."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from test_data_corpus import bomb_png, encode, pattern
from trainer.config import DataConfig
from trainer.data import DatasetError, ImageProblem, decode_image, load_dataset

WHITE = (255, 255, 255)


def decode(tmp_path, data: bytes, background=WHITE, name="x.png"):
    path = tmp_path / name
    path.write_bytes(data)
    return decode_image(path, background)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored left edge becomes the top
    out = decode(tmp_path, encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()), name="p.jpg")
    assert out.image.size == (20, 40)
    px = np.asarray(out.image).astype(int)
    assert np.abs(px[5, 10] - (255, 0, 0)).max() < 30 and np.abs(px[35, 10] - (0, 0, 255)).max() < 30


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 64))
    out = decode(tmp_path, encode(rgba, "PNG"), background=(0, 255, 0))
    a = 64 / 255  # standard "over": a·foreground + (1 − a)·background
    expected = np.array([200 * a, 255 * (1 - a), 0])
    assert np.abs(np.asarray(out.image)[3, 3] - expected).max() <= 1.0
    assert out.has_alpha
    opaque = decode(tmp_path, encode(Image.new("RGBA", (8, 8), (1, 2, 3, 255)), "PNG"), name="o.png")
    assert not opaque.has_alpha and opaque.image.getpixel((0, 0)) == (1, 2, 3)  # background plays no part


def test_palette_with_transparency_and_grey_alpha(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = decode(tmp_path, encode(pal, "PNG", transparency=0), background=(9, 99, 199))
    assert out.image.getpixel((0, 0)) == (9, 99, 199) and out.image.getpixel((2, 2)) == (10, 20, 30)
    la = Image.new("LA", (4, 4), (100, 0))  # fully transparent grey
    assert decode(tmp_path, encode(la, "PNG"), name="la.png").image.getpixel((1, 1)) == WHITE


def test_sixteen_bit_cmyk_and_grey_become_rgb(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    deep = decode(tmp_path, encode(Image.fromarray(values, "I;16"), "PNG"), name="d.png")
    got = np.asarray(deep.image).astype(int)
    assert deep.image.mode == "RGB" and np.abs(got[..., 0] - values / 257).max() <= 1  # scaled, not clipped
    cmyk = decode(tmp_path, encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), name="c.jpg")
    assert np.abs(np.asarray(cmyk.image)[8, 8].astype(int) - (255, 0, 0)).max() < 10
    bilevel = Image.new("1", (8, 8), 1)
    assert decode(tmp_path, encode(bilevel, "BMP"), name="b.bmp").image.getpixel((0, 0)) == WHITE


def test_bomb_guard_stays_on(tmp_path, monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageProblem, match="decompression-bomb guard"):
        decode(tmp_path, bomb_png())
    assert Image.MAX_IMAGE_PIXELS == before
    # Between the warning and the error thresholds Pillow only warns: the image is used, the report says so.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    out = decode(tmp_path, encode(pattern(64, 64, 0), "PNG"), name="big.png")
    assert out.image.size == (64, 64) and "decompression-bomb warning" in out.notes[0]


def _dataset(tmp_path, img: Image.Image, **cfg):
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    img.save(folder / "a.png")
    values = dict(dataset=str(folder), resolution=64, min_bucket_reso=64, max_bucket_reso=64, bucket_step=32)
    values.update(cfg)
    return load_dataset(DataConfig(**values), seed=0)


def _ramp(w: int, h: int) -> Image.Image:
    """Red channel = 2·x, so a column's origin can be read back from its value."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (np.arange(w) * 2)[None, :]
    arr[..., 2] = 77
    return Image.fromarray(arr)


def _columns(pixels: torch.Tensor) -> np.ndarray:
    """Back to source x for each column of the red channel."""
    return np.round(((pixels[0, 0].numpy() + 1) * 127.5) / 2).astype(int)


def test_centre_crop_and_flip(tmp_path):
    ds = _dataset(tmp_path, _ramp(128, 64))  # the only bucket is 64×64: no resize, crop 32 px off each side
    draw = ds.epoch_batches(0, 1)[0][0]
    pixels, (top, left) = ds.load_pixels(draw)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert (top, left) == (0, 32) and list(_columns(pixels)) == list(range(32, 96))
    assert torch.allclose(pixels[2], torch.full((64, 64), 77 / 127.5 - 1))
    flipped, crop = ds.load_pixels(type(draw)(draw.image, True, draw.caption, draw.crop_seed))
    assert list(_columns(flipped)) == list(range(95, 31, -1)) and crop == (0, 32)


def test_random_crop_follows_the_seed(tmp_path):
    ds = _dataset(tmp_path, _ramp(128, 64), crop="random", flip=True)
    assert ds.random_crop
    lefts = set()
    for batch in ds.epoch_batches(0, 1) + ds.epoch_batches(1, 1) + ds.epoch_batches(2, 1):
        draw = batch[0]
        pixels, (top, left) = ds.load_pixels(draw)
        assert (top, left) == ds.crop_top_left(draw)  # known before decoding, for the latent cache key
        raw_left = 64 - left if draw.flip else left  # SDXL's crop is mirrored with the picture
        cols = list(range(raw_left, raw_left + 64))
        assert list(_columns(pixels)) == (cols[::-1] if draw.flip else cols)
        lefts.add(raw_left)
        again, _ = ds.load_pixels(draw)
        assert torch.equal(pixels, again)
    ds2 = _dataset(tmp_path, _ramp(128, 64), crop="random", flip=True)
    d1, d2 = ds.epoch_batches(5, 1)[0][0], ds2.epoch_batches(5, 1)[0][0]
    assert d1 == d2 and torch.equal(ds.load_pixels(d1)[0], ds2.load_pixels(d2)[0])


def test_small_images_upscale_unless_no_upscale(tmp_path):
    ds = _dataset(tmp_path, pattern(60, 20, 1), min_bucket_reso=32, max_bucket_reso=128)
    assert ds.images[0].bucket == (96, 32)  # aspect 3.0 exactly; enlarged 1.6×
    pixels, _ = ds.load_pixels(ds.epoch_batches(0, 1)[0][0])
    assert pixels.shape == (3, 32, 96) and pixels.min() >= -1 and pixels.max() <= 1
    ds = _dataset(tmp_path, pattern(100, 70, 1), resolution=128, min_bucket_reso=32, max_bucket_reso=128,
                  no_upscale=True)
    assert ds.images[0].bucket == (96, 64)  # under the 128² budget: its own size rounded down, never enlarged
    assert ds.load_pixels(ds.epoch_batches(0, 1)[0][0])[0].shape == (3, 64, 96)


def test_too_small_for_no_upscale_is_skipped_with_the_fix(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pattern(64, 64, 0).save(folder / "ok.png")
    pattern(40, 20, 0).save(folder / "sliver.png")
    ds = load_dataset(DataConfig(dataset=str(folder), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                 bucket_step=32, no_upscale=True), 0)
    (path, reason), = ds.report.skipped
    assert path.name == "sliver.png" and "no_upscale" in reason


def test_file_changed_during_training_is_an_error_naming_it(tmp_path):
    ds = _dataset(tmp_path, _ramp(128, 64))
    pattern(128, 64, 3).save(ds.images[0].path)
    with pytest.raises(DatasetError, match="a.png changed after the dataset was checked"):
        ds.load_pixels(ds.epoch_batches(0, 1)[0][0])
