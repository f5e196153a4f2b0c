"""Epoch batches: every image `repeats` times, one bucket per full batch, a pure function of (seed, epoch)."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from test_data_corpus import pattern
from trainer.config import DataConfig
from trainer.data import load_dataset

# (size, how many): with resolution 64 / step 32 these land in four different buckets
SIZES = [((64, 64), 4), ((96, 32), 3), ((32, 96), 2), ((128, 32), 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("epochs")
    k = 0
    for (w, h), n in SIZES:
        for _ in range(n):
            pattern(w, h, k).save(root / f"img{k}.png")
            (root / f"img{k}.txt").write_text(f"tag{k}, red, blue, green, round")
            k += 1
    return root


def dataset(folder, seed=0, **cfg):
    values = dict(dataset=str(folder), resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32,
                  repeats=3)
    values.update(cfg)
    return load_dataset(DataConfig(**values), seed)


@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_batches_are_full_single_bucket_and_cover_every_repeat(folder, batch):
    ds = dataset(folder)
    assert len({r.bucket for r in ds.images}) == 4
    batches = ds.epoch_batches(0, batch)
    assert len(batches) == ds.batches_per_epoch(batch)
    seen = Counter()
    for b in batches:
        assert len(b) == batch and len({ds.images[d.image].bucket for d in b}) == 1
        seen.update(d.image for d in b)
    for bucket in {r.bucket for r in ds.images}:
        members = [i for i, r in enumerate(ds.images) if r.bucket == bucket]
        draws = sum(ds.images[i].repeats for i in members)
        assert sum(seen[i] for i in members) == math.ceil(draws / batch) * batch
        for i in members:  # each at least `repeats` times; the wrap-around adds under one batch per bucket
            assert ds.images[i].repeats <= seen[i] <= ds.images[i].repeats + math.ceil((batch - 1) / len(members))


def test_same_seed_and_epoch_same_batches_on_any_process(folder):
    kw = dict(flip=True, shuffle_tags=True, tag_dropout=0.2, caption_dropout=0.1, crop="random")
    a, b = dataset(folder, seed=7, **kw), dataset(folder, seed=7, **kw)  # two "processes"
    assert a.epoch_batches(3, 4) == b.epoch_batches(3, 4)
    assert a.epoch_batches(3, 4) != a.epoch_batches(4, 4)
    assert a.epoch_batches(3, 4) != dataset(folder, seed=8, **kw).epoch_batches(3, 4)
    assert not a.captions_fixed and a.random_crop


def test_flips_and_fixed_captions(folder):
    plain = dataset(folder, trigger_word="zzt")
    draws = [d for b in plain.epoch_batches(0, 1) for d in b]
    assert not any(d.flip for d in draws) and plain.captions_fixed and not plain.random_crop
    assert all(d.caption == plain.images[d.image].caption and d.caption.startswith("zzt, tag") for d in draws)
    flipped = [d.flip for e in range(10) for b in dataset(folder, flip=True).epoch_batches(e, 1) for d in b]
    assert 0.4 < sum(flipped) / len(flipped) < 0.6
    # Turning flips on changes nothing else about a draw.
    on = [d for b in dataset(folder, flip=True, shuffle_tags=True).epoch_batches(2, 2) for d in b]
    off = [d for b in dataset(folder, flip=False, shuffle_tags=True).epoch_batches(2, 2) for d in b]
    assert [(d.image, d.caption, d.crop_seed) for d in on] == [(d.image, d.caption, d.crop_seed) for d in off]


def test_a_runs_report_counts_its_steps_at_the_runs_batch_size(folder):
    """The UI's report is about a run: with batch size 4 it says how many steps an epoch takes at 4 (one bucket per
    batch, so not draws / 4), the number of batches the training loop draws."""
    from trainer.config import build_config
    from trainer.data import dataset_report

    data = dict(dataset=str(folder), resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32, repeats=3)
    report = dataset_report(build_config({"data": data, "training": {"batch_size": 4}}))
    batches = len(dataset(folder).epoch_batches(0, 4))
    assert f"Images per epoch: 30; steps per epoch at batch size 4: {batches}" in report.lines()
    assert batches == 3 + 3 + 2 + 1  # 12, 9, 6 and 3 draws in four buckets
    assert "Steps per epoch at batch size 1: 30" in dataset_report(build_config({"data": data})).lines()
    accum = dataset_report(build_config({"data": data, "training": {"batch_size": 4, "grad_accum": 2}}))
    # with accumulation an optimiser step spends two batches: 9 batches are ceil(9 / 2) = 5 steps, as the loop counts
    assert (f"Images per epoch: 30; batches of 4 per epoch: {batches}; steps per epoch with gradient accumulation "
            f"2: 5") in accum.lines()
    assert accum.to_dict()["steps_per_epoch"] == 5 and accum.to_dict()["draws_per_epoch"] == 30
    empty = folder.parent / "empty-set"
    empty.mkdir(exist_ok=True)
    unusable = dataset_report(build_config({"data": {**data, "dataset": str(empty)}, "training": {"batch_size": 4}}))
    assert not unusable.usable and "steps per epoch at batch size 4: 0" in "\n".join(unusable.lines())
