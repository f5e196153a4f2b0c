"""Datasets in the page: named before uploading, add or replace when a set has images, delete one picture, a
Latin-1 caption shown as training reads it, a large set paged, a kohya folder opened by path, and refusals as
one readable sentence. Each claim is checked on disk too. Needs no training."""
from __future__ import annotations

import pytest
from PIL import Image

from page_tools import choose, field, new_dataset, open_page, toast, upload, wait_value

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def pictures(folder, names, colour=(200, 30, 30), captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        files.append(str(folder / f"{name}.png"))
        if captions is not None:
            (folder / f"{name}.txt").write_bytes(captions[i])
            files.append(str(folder / f"{name}.txt"))
    return files


def caption_count(page, n: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('.caption-box textarea').length === {n}", timeout=30_000)


def test_new_dataset_add_replace_and_delete_an_image(studio, browser, shots, tmp_path):
    page = open_page(browser, studio.url, shots)
    field(page, "new-dataset-name").wait_for(state="attached")
    new_dataset(page, "mixed")
    folder = studio.outputs_dir / "datasets" / "mixed"
    assert folder.is_dir() and not any(folder.iterdir())
    upload(page, pictures(tmp_path / "a", ["one", "two"]))
    wait_value(page, "upload-message", "now holds 2 images")
    caption_count(page, 2)
    shots.take(page, "two-uploaded")
    # a second upload into the set asks first
    upload(page, pictures(tmp_path / "b", ["three"], (30, 30, 200)))
    page.locator("#upload-question", has_text="already holds 2 images").wait_for(timeout=30_000)
    shots.take(page, "add-or-replace")
    assert len(list(folder.glob("*.png"))) == 2, "nothing is written before the choice"
    page.locator("#upload-add").click()
    wait_value(page, "upload-message", "added to the 2 already there; 'mixed' now holds 3 images")
    caption_count(page, 3)
    upload(page, pictures(tmp_path / "c", ["four"], (30, 200, 30)))
    page.locator("#upload-replace").click()
    wait_value(page, "upload-message", "replacing 3")
    caption_count(page, 1)
    assert [p.name for p in folder.glob("*.png")] == ["four.png"]
    assert len(list((studio.outputs_dir / "trash").rglob("*.png"))) >= 3, "replaced pictures are kept"
    # the picker counts the images
    assert field(page, "dataset-name").input_value().startswith("mixed (1 images)")
    page.locator(".delete-image").first.click()
    wait_value(page, "upload-message", "Deleted four.png")
    caption_count(page, 0)
    assert not list(folder.glob("*.png"))
    shots.take(page, "deleted")


def test_a_latin1_caption_shows_as_training_reads_it(studio, browser, shots):
    folder = studio.outputs_dir / "datasets" / "latin"
    pictures(folder, ["cafe", "plain"], captions=["un café crème, zebrastyle".encode("latin-1"), b"a red square"])
    page = open_page(browser, studio.url, shots)
    choose(page, "dataset-name", "latin (2 images)")
    caption_count(page, 2)
    assert page.locator(".caption-box textarea").first.input_value() == "un café crème, zebrastyle"
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").all_inner_texts()
    shots.take(page, "latin1")


def test_a_large_set_is_paged(studio, browser, shots):
    folder = studio.outputs_dir / "datasets" / "many"
    pictures(folder, [f"{i:02d}" for i in range(30)])
    page = open_page(browser, studio.url, shots)
    choose(page, "dataset-name", "many (30 images)")
    page.locator("#page-label", has_text="30 images · showing 1–24 · page 1 of 2").wait_for(timeout=30_000)
    caption_count(page, 24)
    page.locator("#page-next").click()
    page.locator("#page-label", has_text="showing 25–30 · page 2 of 2").wait_for(timeout=30_000)
    caption_count(page, 6)
    assert page.locator(".caption-box label, .caption-box span", has_text="29.png").count()
    shots.take(page, "paged")
    page.locator("#captions").get_by_text("Captions", exact=True).first.click()  # the grid folds away
    page.locator(".caption-box").first.wait_for(state="hidden", timeout=10_000)


def test_a_kohya_folder_is_opened_by_path_and_only_read(studio, browser, shots, tmp_path):
    parent = tmp_path / "kohya"
    pictures(parent / "10_zorbo", ["z1", "z2", "z3"])
    before = sorted(p.name for p in parent.rglob("*"))
    page = open_page(browser, studio.url, shots)
    page.get_by_text("Open a folder elsewhere by its path").click()
    field(page, "open-path").fill(str(parent))
    page.locator("#open-folder").click()
    wait_value(page, "upload-message", "3 images \\(read-only here\\)")
    caption_count(page, 3)
    assert not page.locator(".delete-image").count(), "no Delete on a folder that is only read"
    page.locator("#check-dataset").click()
    wait_value(page, "dataset-report", "Usable: yes")
    upload(page, pictures(tmp_path / "x", ["intruder"]))
    message = toast(page, "opened by its path")
    assert "<" not in message and message.count(". ") <= 1, message
    assert sorted(p.name for p in parent.rglob("*")) == before
    shots.take(page, "opened-by-path")


def test_refusals_are_one_readable_sentence(studio, browser, shots):
    page = open_page(browser, studio.url, shots)
    if not page.locator("#new-dataset-name").is_visible():
        page.locator("#new-dataset").click()
    field(page, "new-dataset-name").fill("../escape")
    page.locator("#create-dataset").click()
    message = toast(page, "dataset name")
    assert "may not contain" in message and "Traceback" not in message and "Error:" not in message
    assert not (studio.outputs_dir / "escape").exists()
    shots.take(page, "refused")
