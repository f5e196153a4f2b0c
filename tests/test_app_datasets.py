"""Datasets in the UI: named before uploading, counted, images deleted to the trash (never for good), an upload
into a non-empty set added or replacing, and a kohya folder elsewhere opened by path and only read."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from app import datasets as ds
from app.errors import UserError
from app.folders import Folders
from trainer.config import DataConfig
from trainer.data import load_dataset


def png(path, color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def folders(tmp_path):
    return Folders.create(tmp_path / "models", tmp_path / "outputs")


def uploads(tmp_path, names):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files = []
    for name in names:
        files.append(str(png(src / f"{name}.png")))
        (src / f"{name}.txt").write_text(f"a picture called {name}")
        files.append(str(src / f"{name}.txt"))
    return files


def test_new_dataset_counts_add_replace_and_delete_to_the_trash(folders, tmp_path):
    assert ds.new_dataset(folders, "cats") == "cats"
    with pytest.raises(UserError, match="exists already"):
        ds.new_dataset(folders, "cats")
    with pytest.raises(UserError, match="may not contain"):
        ds.new_dataset(folders, "../cats")
    assert ds.counted_choices(folders) == [("cats (0 images)", "cats")]
    assert "now holds 2 images" in ds.upload_into(folders, uploads(tmp_path, ["a", "b"]), "cats", "add")
    message = ds.upload_into(folders, uploads(tmp_path, ["c"]), "cats", "add")
    assert "added to the 2 already there" in message and "now holds 3 images" in message
    assert ds.counted_choices(folders) == [("cats (3 images)", "cats")]

    message = ds.delete_image(folders, "cats", "b.png")
    folder = folders.dataset_path("cats")
    assert [p.name for p in ds.images_of(folders, "cats")] == ["a.png", "c.png"]
    trashed = sorted(p.name for p in (folders.outputs_dir / "trash").rglob("*") if p.is_file())
    assert trashed == ["b.png", "b.txt"] and "kept in" in message  # the caption went with its image
    # training sees exactly what the page now shows
    trained = load_dataset(DataConfig(dataset=str(folder), resolution=64), 0).images
    assert sorted(r.path.name for r in trained) == ["a.png", "c.png"]
    with pytest.raises(UserError, match="not in the dataset"):
        ds.delete_image(folders, "cats", "../../models/x.png")

    message = ds.upload_into(folders, uploads(tmp_path, ["d"]), "cats", "replace")
    assert "replacing 2" in message and [p.name for p in ds.images_of(folders, "cats")] == ["d.png"]
    assert len([p for p in (folders.outputs_dir / "trash").rglob("*.png")]) == 3

    ds.delete_dataset(folders, "cats")
    assert ds.counted_choices(folders) == [] and not folder.exists()
    assert any(p.name == "d.png" for p in (folders.outputs_dir / "trash").rglob("*.png"))


def test_a_kohya_folder_opened_by_path_is_listed_and_never_written(folders, tmp_path):
    parent = tmp_path / "elsewhere"
    (parent / "10_zorbo").mkdir(parents=True)
    png(parent / "10_zorbo" / "1.png")
    png(parent / "10_zorbo" / "2.png")
    value = ds.open_folder(str(parent))
    assert [p.name for p in ds.images_of(folders, value)] == ["1.png", "2.png"]
    assert ds.dataset_dir(folders, value) == parent.resolve()
    before = sorted(p.name for p in parent.rglob("*"))
    for action in (lambda: ds.delete_image(folders, value, "1.png"), lambda: ds.delete_dataset(folders, value),
                   lambda: ds.upload_into(folders, uploads(tmp_path, ["x"]), value, "add")):
        with pytest.raises(UserError, match="opened by its path"):
            action()
    assert sorted(p.name for p in parent.rglob("*")) == before
    with pytest.raises(UserError, match="not an absolute path"):
        ds.open_folder("datasets/x")
    with pytest.raises(UserError, match="is not a folder"):
        ds.open_folder(str(tmp_path / "missing"))
