"""Dataset layouts: a plain folder, kohya repeat folders, and the dataset TOML with regularisation subsets."""
from __future__ import annotations

import pytest

from test_data_corpus import pattern
from trainer.config import DataConfig, TrainConfig
from trainer.data import DatasetError, dataset_report, load_dataset

SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32)


def images(folder, names, captions=None, ext=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        pattern(64, 64, hash((str(folder), name)) % 1000).save(folder / name)
        if captions and captions[k] is not None:
            (folder / name).with_suffix(ext).write_text(captions[k], encoding="utf-8")


def load(path, **cfg):
    return load_dataset(DataConfig(dataset=str(path), **{**SMALL, **cfg}), 0)


def test_plain_folder_caption_extension_and_fallback(tmp_path):
    images(tmp_path, ["a.png", "b.png"], ["from txt", None])
    (tmp_path / "b.caption").write_text("from caption")
    (tmp_path / "a.caption").write_text("unused: a.txt wins")
    (tmp_path / "orphan.txt").write_text("no picture")
    (tmp_path / "old").mkdir()
    ds = load(tmp_path, repeats=4)
    assert {r.path.name: (r.caption, r.repeats, r.folder) for r in ds.images} == {
        "a.png": ("from txt", 4, tmp_path.name), "b.png": ("from caption", 4, tmp_path.name)}
    joined = "\n".join(ds.report.warnings)
    assert "orphan.txt has no image" in joined and "a.caption is unused: a.png reads a.txt" in joined
    assert "subfolders not read: old" in joined
    # A configured extension (with or without the dot) replaces .txt; .caption stays the fallback.
    (tmp_path / "a.tags").write_text("from tags")
    ds = load(tmp_path, caption_extension="tags")
    assert {r.path.name: r.caption for r in ds.images} == {"a.png": "from tags", "b.png": "from caption"}


def test_repeat_folders(tmp_path):
    images(tmp_path / "10_sks dog", ["a.png", "b.png"], ["sks dog, grass", None])
    images(tmp_path / "1_style_name", ["c.jpg"])
    images(tmp_path / "misc", ["d.png"])
    ds = load(tmp_path, trigger_word="sks dog")
    got = {r.path.name: (r.caption, r.repeats, r.folder) for r in ds.images}
    assert got == {"a.png": ("sks dog, grass", 10, "10_sks dog"), "b.png": ("sks dog", 10, "10_sks dog"),
                   "c.jpg": ("sks dog, style_name", 1, "1_style_name")}  # class text, trigger prepended once
    assert any("misc skipped" in w and "10_misc" in w for w in ds.report.warnings)
    assert ds.dataset_dirs == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                               "1_style_name": {"n_repeats": 1, "img_count": 1}}
    assert ds.report.draws_per_epoch == 21


def test_toml_subsets_with_regularisation(tmp_path):
    images(tmp_path / "imgs" / "5_zkz cat", ["a.png", "b.png"], ["zkz cat, sofa", "zkz cat, bed"])
    images(tmp_path / "reg", ["r1.png", "r2.png", "r3.png"], ["cat"] * 3, ext=".caption")
    images(tmp_path / "more", ["m.png"], ["zkz cat, window"], ext=".cap")
    toml = tmp_path / "data.toml"
    toml.write_text('''
caption_extension = ".caption"
[[subsets]]
image_dir = "imgs/5_zkz cat"          # repeats and class text from the folder name
caption_extension = ".txt"
[[subsets]]
image_dir = "reg"
class_tokens = "cat"
is_reg = true
[[subsets]]
image_dir = "more"
num_repeats = 2
caption_extension = "cap"
''')
    ds = load(toml, prior_loss_weight=0.5)
    by = {r.path.name: r for r in ds.images}
    assert {n: (r.repeats, r.is_reg, r.loss_weight) for n, r in by.items() if not r.is_reg} == {
        "a.png": (5, False, 1.0), "b.png": (5, False, 1.0), "m.png": (2, False, 1.0)}
    assert by["m.png"].caption == "zkz cat, window" and by["r1.png"].caption == "cat"
    reg = [r for r in ds.images if r.is_reg]
    assert all(r.loss_weight == 0.5 for r in reg)
    # kohya's balance: 12 training draws per epoch, so the 3 regularisation images are drawn 12 times in all.
    assert sum(r.repeats for r in reg) == 12 and sorted(r.repeats for r in reg) == [4, 4, 4]
    assert ds.report.draws_per_epoch == 24
    assert ds.reg_dataset_dirs == {"reg": {"n_repeats": 1, "img_count": 3}}
    assert set(ds.dataset_dirs) == {"5_zkz cat", "more"}
    assert "(regularisation images, class 'cat')" in "\n".join(ds.report.lines())


@pytest.mark.parametrize("text,phrase", [
    ('[general]\nshuffle_caption = true\n[[datasets]]\n', "kohya sd-scripts config"),
    ('[[subsets]]\nimage_dir = "nowhere"\n', "is not a folder"),
    ('[[subsets]]\nimage_dir = "imgs"\nnum_repeat = 3\n', "unknown key `num_repeat`"),
    ('[[subsets]]\nimage_dir = "imgs"\nis_reg = "yes"\n', "`is_reg` must be a true/false"),
    ('[[subsets]]\nimage_dir = "imgs"\nnum_repeats = 0\n', "`num_repeats` must be a whole number"),
    ('subsets = [', "cannot read the dataset TOML"),
])
def test_toml_errors_name_the_key(tmp_path, text, phrase):
    images(tmp_path / "imgs", ["a.png"])
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(DatasetError, match=phrase):
        load(toml)
    report = dataset_report(toml)
    assert not report.usable and phrase in report.reason


def test_only_regularisation_images_is_not_enough(tmp_path):
    images(tmp_path / "reg", ["r.png"])
    (tmp_path / "d.toml").write_text('[[subsets]]\nimage_dir = "reg"\nis_reg = true\n')
    with pytest.raises(DatasetError, match="only regularisation images"):
        load(tmp_path / "d.toml")


@pytest.mark.parametrize("cfg,phrase", [
    (dict(dataset=""), "no dataset chosen"),
    (dict(background="blu"), "`data.background` = 'blu' is not a colour"),
    (dict(caption_lines="all"), "`data.caption_lines`"),
    (dict(resolution=2048, max_bucket_reso=1024), "`data.resolution` (2048) must lie between"),
    (dict(keep_tokens=-1), "`data.keep_tokens` must be ≥ 0, got -1"),
    (dict(resolution=500), "`data.resolution` (500) must be a multiple of `data.bucket_step` (64)"),
    (dict(crop="middle"), "`data.crop` = 'middle' is not one of: center, random"),
])
def test_bad_settings_are_named(tmp_path, cfg, phrase):
    images(tmp_path, ["a.png"])
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(**{"dataset": str(tmp_path), **cfg}), 0)
    assert phrase in str(err.value)


def test_report_from_a_train_config_uses_its_settings(tmp_path):
    images(tmp_path / "3_x", ["a.png"], ["x, y"])
    cfg = TrainConfig()
    cfg.data.dataset, cfg.data.resolution, cfg.data.min_bucket_reso = str(tmp_path), 256, 256
    report = dataset_report(cfg)
    assert report.usable and report.buckets == {(256, 256): 1} and report.top_tags == [("x", 1), ("y", 1)]
    assert report.to_dict()["folders"][0] == {"name": "3_x", "path": str(tmp_path / "3_x"), "repeats": 3,
                                              "class_tokens": "x", "is_reg": False, "images": 1, "draws": 3}
