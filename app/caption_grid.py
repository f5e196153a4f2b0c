"""The caption editor: a page of thumbnails, each with its caption (saved when the box is left) and Delete.

Paged (PAGE_SIZE images at a time) so that a set of hundreds renders quickly; a folder opened by path is shown
read-only, its thumbnails made here (the browser is only served files from the app's own folders).
"""
from __future__ import annotations

import functools
import math

import gradio as gr
from PIL import Image

from app import datasets
from app.errors import UserError, shown_as_gr_error
from app.folders import Folders
from app.uploads import read_caption, write_caption

PAGE_SIZE = 24
COLUMNS = 4


def page_label(count: int, page: int) -> str:
    pages = max(math.ceil(count / PAGE_SIZE), 1)
    first = page * PAGE_SIZE + 1 if count else 0
    return f"{count} images · showing {first}–{min((page + 1) * PAGE_SIZE, count)} · page {page + 1} of {pages}"


def turn_page(folders: Folders, value: str, page: int, by: int) -> tuple[int, str]:
    count = len(datasets.images_of(folders, value))
    page = min(max(page + by, 0), max(math.ceil(count / PAGE_SIZE) - 1, 0))
    return page, page_label(count, page)


def _thumbnail(path) -> Image.Image:
    with Image.open(path) as image:
        image.thumbnail((256, 256))
        return image.convert("RGB")


def _caption_or_note(image) -> str:
    try:
        return read_caption(image)
    except UserError as e:  # one unreadable caption must not blank the whole editor
        return f"(cannot read this caption: {e})"


def build_caption_grid(demo: gr.Blocks, folders: Folders, dataset: gr.Dropdown, version: gr.State, page: gr.State,
                       message: gr.Textbox) -> None:
    """The grid, re-rendered when the dataset, its contents (version) or the page change."""

    @shown_as_gr_error
    def delete(value: str, v: int, name: str = ""):
        return datasets.delete_image(folders, value, name), v + 1

    @gr.render(inputs=[dataset, version, page], triggers=[dataset.change, version.change, page.change, demo.load])
    def grid(value, _version, page_number):
        images = datasets.images_of(folders, value)
        if not images:
            gr.Markdown("*No images in this dataset yet: upload some above.*" if value else
                        "*No dataset chosen: press **New dataset…** and name it, then upload images.*")
            return
        managed = datasets.is_managed(folders, value)
        start = min(page_number or 0, max(math.ceil(len(images) / PAGE_SIZE) - 1, 0)) * PAGE_SIZE
        shown = images[start:start + PAGE_SIZE]
        for row_start in range(0, len(shown), COLUMNS):
            with gr.Row(equal_height=True):
                for image in shown[row_start:row_start + COLUMNS]:
                    with gr.Column(min_width=150, elem_classes="caption-card"):
                        gr.Image(str(image) if managed else _thumbnail(image), show_label=False, height=130,
                                 interactive=False, buttons=[], container=False)
                        box = gr.Textbox(_caption_or_note(image), label=image.name, lines=2, interactive=managed,
                                         elem_classes="caption-box")
                        if not managed:
                            continue

                        @shown_as_gr_error
                        def save_caption(text, image=image):
                            write_caption(image, text)
                        box.blur(save_caption, inputs=box, outputs=None, show_progress="hidden")
                        remove = gr.Button("Delete", size="sm", variant="secondary", elem_classes="delete-image")
                        remove.click(functools.partial(delete, name=image.name), [dataset, version],
                                     [message, version], show_progress="hidden")
