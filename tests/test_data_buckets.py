"""Aspect-ratio buckets: kohya's list, and properties over many random image sizes."""
from __future__ import annotations

import random

import pytest

from trainer.data import Bucketer, cover_size, crop_offsets, make_bucket_resolutions
from trainer.data.buckets import BucketError

# kohya's list for resolution 512, min 256, max 1024, step 64, worked out by hand from its rule
# (height = the largest multiple of 64 with width·height ≤ 512², capped at 1024; both orientations).
KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]


def random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        aspect = 2 ** rng.uniform(-2.5, 2.5)  # 0.18 … 5.7: beyond the bucket range on both ends
        area = 2 ** rng.uniform(8, 24)  # 16² … 4096² pixels
        w, h = (area * aspect) ** 0.5, (area / aspect) ** 0.5
        sizes.append((max(1, round(w)), max(1, round(h))))
    return sizes + [(512, 512), (1, 1), (10000, 10), (10, 10000), (768, 320)]


def test_kohya_bucket_list():
    assert make_bucket_resolutions(512, 256, 1024, 64) == KOHYA_512


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (1024, 32), (1024, 64)])
def test_every_size_gets_the_closest_bucket_within_budget(resolution, step):
    b = Bucketer(resolution, 256, 2048 if resolution == 1024 else 1024, step, no_upscale=False)
    aspects = sorted(w / h for w, h in b.predefined)
    half_gap = max(hi - lo for lo, hi in zip(aspects, aspects[1:])) / 2
    for w, h in random_sizes(1500, resolution + step):
        choice = b.select(w, h)
        bw, bh = choice.bucket
        assert choice.bucket in b.predefined
        assert bw * bh <= resolution ** 2 and bw % step == 0 and bh % step == 0
        assert abs(choice.ar_error - (bw / bh - w / h)) < 1e-12
        best = min(abs(x / y - w / h) for x, y in b.predefined)
        assert abs(choice.ar_error) <= best + 1e-12  # no other bucket is closer
        if aspects[0] <= w / h <= aspects[-1]:
            assert abs(choice.ar_error) <= half_gap + 1e-12
        assert b.select(w, h) == choice  # a function of the size alone


def test_no_upscale_buckets_fit_inside_the_image():
    b = Bucketer(512, 256, 1024, 64, no_upscale=True)
    placed = 0
    for w, h in random_sizes(1500, 7):
        try:
            bw, bh = b.select(w, h).bucket
        except BucketError as e:
            assert min(w, h) < 64 and "data.no_upscale" in str(e)  # only a side under one step has no bucket
            continue
        placed += 1
        assert bw <= w and bh <= h, (w, h, bw, bh)  # never enlarged
        assert bw * bh <= 512 ** 2 and bw % 64 == 0 and bh % 64 == 0 and max(bw, bh) <= 1024
        if w * h <= 512 ** 2:  # under the budget: the image's own size, rounded down (kohya)
            assert (bw, bh) == (min(w - w % 64, 1024), min(h - h % 64, 1024))
    assert placed > 900
    assert b.select(1000, 999).bucket == (512, 512)  # not kohya's 512×448


def test_cover_and_crop_geometry():
    rng = random.Random(3)
    for w, h in random_sizes(500, 11):
        bucket = (rng.choice([64, 128, 512]), rng.choice([64, 256, 768]))
        rw, rh = cover_size((w, h), bucket)
        assert rw >= bucket[0] and rh >= bucket[1] and (rw == bucket[0] or rh == bucket[1])
        assert abs(rw / rh - w / h) <= (w / h) * (1 / min(rw, rh) + 1 / min(w, h)) + 1e-9  # aspect kept to a pixel
        top, left = crop_offsets((rw, rh), bucket, "center", 0)
        assert (top, left) == ((rh - bucket[1]) // 2, (rw - bucket[0]) // 2)
        seed = rng.getrandbits(32)
        top, left = crop_offsets((rw, rh), bucket, "random", seed)
        assert 0 <= top <= rh - bucket[1] and 0 <= left <= rw - bucket[0]
        assert crop_offsets((rw, rh), bucket, "random", seed) == (top, left)


@pytest.mark.parametrize("args,phrase", [
    ((512, 256, 1024, 48, False), "multiple of `data.bucket_step`"),
    ((1024, 256, 768, 64, False), "between `data.min_bucket_reso`"),
    ((500, 256, 1024, 64, False), "`data.resolution` = 500"),
])
def test_bad_bucket_settings_name_the_key(args, phrase):
    with pytest.raises(BucketError, match=phrase.replace("(", r"\(").replace("[", r"\[")):
        Bucketer(*args)
