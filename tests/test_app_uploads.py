"""Uploads can only write inside their dataset folder; captions and bulk caption edits round-trip on disk."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.errors import UserError
from app.folders import Folders, safe_folder_name
from app.uploads import (add_trigger_word, find_replace, list_images, read_caption, safe_file_name, save_uploads,
                         write_caption)


def png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name, expected", [
    ("cat.png", "cat.png"),
    ("../../etc/evil.png", "evil.png"),
    ("/abs/path/x.png", "x.png"),
    ("C:\\Users\\me\\pic.jpg", "pic.jpg"),
    ("C:pic.jpg", "pic.jpg"),
    ("sub/dir/a b.txt", "a b.txt"),
    ("we|rd<name>.png", "we_rd_name_.png"),
    ("..png", "png"),  # leading dots are stripped: never a hidden file
])
def test_safe_file_name_keeps_only_a_plain_name(name, expected):
    assert safe_file_name(name) == expected


@pytest.mark.parametrize("name", ["..", ".", "/", "a/..", "", "   "])
def test_safe_file_name_refuses_names_that_are_no_file(name):
    with pytest.raises(UserError):
        safe_file_name(name)


def test_zip_slip_entries_land_inside_the_dataset_folder(tmp_path):
    outside = tmp_path / "outside"
    dataset = tmp_path / "sandbox" / "ds"
    zpath = tmp_path / "upload.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("../../outside/evil.png", png_bytes())
        z.writestr("/etc/abs.png", png_bytes())
        z.writestr("10_style/a.png", png_bytes((0, 255, 0)))
        z.writestr("10_style/a.txt", "green square")
        z.writestr("5_other/a.png", png_bytes((0, 0, 255)))
        z.writestr("5_other/a.txt", "blue square")
        z.writestr("__MACOSX/10_style/._a.png", b"junk")
        z.writestr("notes.exe", b"MZ")
    result = save_uploads([zpath], dataset)
    assert not outside.exists()
    assert files_under(tmp_path / "sandbox") == {f"ds/{n}" for n in
                                                 ["evil.png", "abs.png", "a.png", "a.txt", "a_1.png", "a_1.txt"]}
    # a caption follows its own image even when two zip folders hold the same names
    assert Image.open(dataset / "a_1.png").getpixel((0, 0)) == (0, 0, 255)
    assert read_caption(dataset / "a_1.png") == "blue square"
    assert read_caption(dataset / "a.png") == "green square"
    assert [name for name, _ in result.ignored] == ["notes.exe"]


def test_plain_uploads_are_copied_and_reuploading_replaces(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.png").write_bytes(png_bytes())
    (src / "one.txt").write_text("a red square")
    (src / "readme.md").write_text("not data")
    dataset = tmp_path / "ds"
    result = save_uploads([src / "one.png", src / "one.txt", src / "readme.md"], dataset)
    assert sorted(result.saved) == ["one.png", "one.txt"]
    assert "readme.md" in result.message()
    (src / "one.txt").write_text("a red square, again")
    save_uploads([src / "one.txt"], dataset)
    assert files_under(dataset) == {"one.png", "one.txt"}
    assert read_caption(dataset / "one.png") == "a red square, again"


def test_a_broken_zip_is_a_clear_error(tmp_path):
    bad = tmp_path / "photos.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(UserError, match="photos.zip is not a readable zip"):
        save_uploads([bad], tmp_path / "ds")


def test_caption_edits_and_bulk_actions(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for name, caption in [("a.png", "a red circle"), ("b.jpg", "sks, a blue square"), ("c.webp", None)]:
        (ds / name).write_bytes(png_bytes())
        if caption is not None:
            (ds / name).with_suffix(".txt").write_text(caption)
    (ds / "old.png").write_bytes(png_bytes())
    (ds / "old.caption").write_text("kohya caption file")
    images = list_images(ds)
    assert [p.name for p in images] == ["a.png", "b.jpg", "c.webp", "old.png"]
    assert read_caption(ds / "old.png") == "kohya caption file"

    write_caption(ds / "c.webp", "  a green triangle \n")
    assert (ds / "c.txt").read_text() == "a green triangle\n"
    write_caption(ds / "old.png", "edited")  # an existing .caption file is the one edited
    assert (ds / "old.caption").read_text() == "edited\n" and not (ds / "old.txt").exists()

    assert add_trigger_word(ds, "sks") == 3  # b already starts with it: never twice
    assert add_trigger_word(ds, "sks") == 0
    assert [read_caption(p) for p in images] == ["sks, a red circle", "sks, a blue square",
                                                 "sks, a green triangle", "sks, edited"]
    assert find_replace(ds, "a ", "one ") == 3
    assert read_caption(ds / "a.png") == "sks, one red circle"
    with pytest.raises(UserError, match="trigger word is empty"):
        add_trigger_word(ds, " , ")
    with pytest.raises(UserError, match="text to find is empty"):
        find_replace(ds, "", "x")


def test_latin1_captions_and_the_trigger_word_follow_the_engine(tmp_path):
    """A caption saved in Latin-1 shows in the editor as training reads it (it broke the whole editor), and the
    editor's trigger word agrees with training's rule: a caption that holds it anywhere is left alone."""
    from trainer.config import DataConfig
    from trainer.data import load_dataset

    ds = tmp_path / "ds"
    ds.mkdir()
    for name, caption in [("a.png", "café au lait, a red circle".encode("latin-1")),
                          ("b.png", b"a photo of sks dog"), ("c.png", b"a blue square")]:
        (ds / name).write_bytes(png_bytes())
        (ds / name).with_suffix(".txt").write_bytes(caption)
    assert read_caption(ds / "a.png") == "café au lait, a red circle"
    assert add_trigger_word(ds, "sks") == 2  # b holds `sks` already (not at the front)
    shown = {p.name: read_caption(p) for p in list_images(ds)}
    trained = {Path(r.path).name: r.caption for r in load_dataset(DataConfig(dataset=str(ds), resolution=64), 0).images}
    assert shown == trained  # the editor shows exactly what training will read
    assert trained["a.png"] == "sks, café au lait, a red circle" and trained["b.png"] == "a photo of sks dog"
    # and training, told the same trigger word, adds nothing more to any of them
    again = load_dataset(DataConfig(dataset=str(ds), resolution=64, trigger_word="sks"), 0).images
    assert {Path(r.path).name: r.caption for r in again} == trained


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "/abs", "C:x", "a,b"])
def test_typed_folder_names_cannot_escape(name):
    with pytest.raises(UserError):
        safe_folder_name(name, "dataset name")


def test_folders_use_an_existing_comfyui_layout(tmp_path):
    (tmp_path / "models" / "loras").mkdir(parents=True)
    folders = Folders.create(tmp_path / "models", tmp_path / "out")
    assert folders.lora_dir == tmp_path / "models" / "loras"
    assert folders.dataset_path("my-style") == tmp_path / "out" / "datasets" / "my-style"
    assert set(folders.served()) == {str(tmp_path / "models" / "loras"), str(tmp_path / "out")}
    fresh = Folders.create(tmp_path / "fresh", tmp_path / "out2")
    assert fresh.lora_dir == tmp_path / "fresh" / "Lora" and fresh.lora_dir.is_dir()


def test_a_reopened_page_shows_the_dataset_changed_last(tmp_path):
    import os

    folders = Folders.create(tmp_path / "models", tmp_path / "out")
    assert folders.latest_dataset() is None
    for name, when in (("b-older", 1_000), ("a-newer", 2_000), ("c-empty", 500)):
        path = folders.dataset_path(name)
        path.mkdir()
        if name != "c-empty":
            (path / "x.txt").write_text("a caption")
            os.utime(path / "x.txt", (when, when))
        os.utime(path, (when, when))
    assert folders.latest_dataset() == "a-newer"  # by its files, not its name's place in the list
