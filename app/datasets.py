"""Datasets as things to pick: the folders under outputs/datasets with their image counts, a new one named
before anything is uploaded, deleting an image or a whole dataset, adding to or replacing a dataset's images,
and a folder elsewhere on the disk (a kohya layout, say) opened by its path.

Nothing is ever deleted for good: a deleted image (with its caption) or dataset moves to outputs/trash/, from
where a user can take it back. A folder opened by path is the user's own: it is read, never written.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from app.errors import UserError
from app.folders import Folders, safe_folder_name
from app.uploads import CAPTION_SUFFIXES, list_images, save_uploads
from trainer.data.scan import ScanError, scan_dataset


def counted_choices(folders: Folders) -> list[tuple[str, str]]:
    """(label, value) for the dataset picker: every dataset with its image count."""
    return [(f"{name} ({len(list_images(folders.dataset_path(name)))} images)", name)
            for name in folders.list_datasets()]


def dataset_dir(folders: Folders, value: str) -> Path:
    """The folder a picker value stands for: a dataset's name, or an absolute path opened by path."""
    if value and Path(value).is_absolute():
        return Path(value)
    return folders.dataset_path(value)


def is_managed(folders: Folders, value: str) -> bool:
    """True for the app's own datasets (written to); False for a folder opened by path (only read)."""
    return not (value and Path(value).is_absolute())


def images_of(folders: Folders, value: str) -> list[Path]:
    """The images a dataset holds as training reads them (a kohya parent's N_name folders included)."""
    if not value:
        return []
    path = dataset_dir(folders, value)
    if is_managed(folders, value):
        return list_images(path)
    try:
        return [c.path for c in scan_dataset(str(path), ".txt", 1).candidates]
    except ScanError:
        return []


def new_dataset(folders: Folders, name: str) -> str:
    name = safe_folder_name(name, "dataset name")
    path = folders.dataset_path(name)
    if path.exists():
        raise UserError(f"a dataset named '{name}' exists already: pick it in the list, or type another name")
    path.mkdir(parents=True)
    return name


def open_folder(path_text: str) -> str:
    """A folder elsewhere (images with captions, or a parent of kohya N_name folders), by its absolute path."""
    text = (path_text or "").strip()
    path = Path(text).expanduser()
    if not text or not path.is_absolute():
        raise UserError(f"'{text}' is not an absolute path: type the full path, e.g. /home/me/datasets/10_cat")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: type the path of a folder of images (or of kohya N_name folders)")
    return str(path.resolve())


def refuse_outside(folders: Folders, value: str, action: str) -> None:
    if not is_managed(folders, value):
        raise UserError(f"{value} was opened by its path and is only read here, so the app cannot {action} it: "
                        "make a new dataset and upload the images into it")


def _trash(folders: Folders, dataset: str) -> Path:
    folder = folders.outputs_dir / "trash" / f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _move_with_captions(image: Path, trash: Path) -> None:
    for path in [image] + [image.with_suffix(s) for s in CAPTION_SUFFIXES]:
        if path.exists():
            shutil.move(str(path), str(trash / path.name))


def delete_image(folders: Folders, value: str, image_name: str) -> str:
    refuse_outside(folders, value, "delete from")
    folder = dataset_dir(folders, value)
    image = folder / Path(image_name).name
    if image.parent != folder or image not in list_images(folder):
        raise UserError(f"{image_name} is not in the dataset '{value}' any more: the page shows it again now")
    trash = _trash(folders, value)
    _move_with_captions(image, trash)
    return f"Deleted {image.name} (and its caption) from '{value}'; it is kept in {trash} should you want it back."


def delete_dataset(folders: Folders, value: str) -> str:
    refuse_outside(folders, value, "delete")
    folder = dataset_dir(folders, value)
    if not folder.is_dir():
        raise UserError(f"there is no dataset named '{value}': pick one in the list")
    trash = _trash(folders, value)
    shutil.move(str(folder), str(trash / folder.name))
    return f"Deleted the dataset '{value}'; it is kept in {trash} should you want it back."


def upload_into(folders: Folders, files: list[str], value: str, mode: str) -> str:
    """Save uploads into a dataset. mode: "add" keeps its images, "replace" moves them to the trash first."""
    refuse_outside(folders, value, "upload into")
    if not files:
        raise UserError("no files were uploaded: choose images (or a .zip of images and captions) first")
    folder = dataset_dir(folders, value)
    old = list_images(folder)
    if mode == "replace" and old:
        trash = _trash(folders, value)
        for image in old:
            _move_with_captions(image, trash)
    result = save_uploads(files, folder)
    if not result.saved:
        raise UserError(f"none of the uploaded files is an image or a caption. {result.message()}")
    now = len(list_images(folder))
    how = {"add": f" added to the {len(old)} already there", "replace": f" replacing {len(old)} (kept in the trash)"}
    return result.message().replace(" file(s).", f" file(s){how.get(mode, '') if old else ''}; "
                                                 f"'{value}' now holds {now} images.", 1)
