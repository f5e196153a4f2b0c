"""Finding the images of a dataset and the caption file of each, in the three layouts users bring.

1. A folder of images with same-stem caption files: `cat.png` + `cat.txt` (the extension is
   `data.caption_extension`; a `.caption` file is accepted when none with that extension exists).
   Repeats come from `data.repeats`; subfolders are not read (a warning names them).
2. kohya repeat folders: a parent holding `N_name` subfolders, e.g. `10_sks dog/`. Each is read as in (1)
   with N repeats; `name` is the class text, the caption of an image that has no caption file. In such a
   parent, folders without the prefix and loose images are skipped with a warning.
3. A dataset TOML with several subsets (kohya's subset key names; paths relative to the TOML file):

       caption_extension = ".txt"      # optional default for every subset
       [[subsets]]
       image_dir = "10_sks dog"        # required
       num_repeats = 10                # default: N of an N_name folder, else data.repeats
       class_tokens = "sks dog"        # default: name of an N_name folder, else ""
       caption_extension = ".caption"  # default: the top-level value, else data.caption_extension
       is_reg = false                  # true: regularisation images, weighted by data.prior_loss_weight

Nothing here opens an image; decoding and checking happen in images.py.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StudioError
from .images import IMAGE_EXTENSIONS, UNSUPPORTED_EXTENSIONS

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_SUBSET_KEYS = ("image_dir", "num_repeats", "class_tokens", "caption_extension", "is_reg")
_TOP_KEYS = ("subsets", "caption_extension")


class ScanError(StudioError):
    """The dataset path or TOML is unusable as a whole; the message names it and the fix."""


@dataclass
class Subset:
    folder: Path
    name: str  # key in ss_tag_frequency / ss_dataset_dirs: the folder's name (made unique)
    repeats: int
    class_tokens: str
    caption_extension: str
    is_reg: bool = False


@dataclass
class Candidate:
    subset: Subset
    path: Path
    caption_path: Path | None


@dataclass
class Scan:
    root: Path  # what the user pointed at (a folder, or the TOML's folder)
    kind: str  # "folder" | "repeat folders" | "toml"
    subsets: list[Subset] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def normalise_extension(ext: str) -> str:
    ext = ext.strip()
    return ext if ext.startswith(".") else f".{ext}"


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise ScanError(f"cannot list the folder {folder}: {e.strerror or e}") from None


def _is_subfolder(entry: Path) -> bool:
    return entry.is_dir() and not entry.name.startswith(".") and entry.suffix.lower() not in IMAGE_EXTENSIONS


def scan_dataset(dataset: str, caption_extension: str, repeats: int) -> Scan:
    """Every candidate image with its caption file, plus files skipped for their type and layout warnings."""
    if not dataset.strip():
        raise ScanError("no dataset chosen: set data.dataset to a folder of images (with .txt captions), a parent "
                        "of kohya `N_name` folders, or a dataset .toml")
    path = Path(os.path.abspath(Path(dataset).expanduser()))  # absolute, so "." has a name; symlinks kept
    if not path.exists():
        raise ScanError(f"the dataset {path} does not exist; check data.dataset")
    ext = normalise_extension(caption_extension)
    if path.is_file():
        if path.suffix.lower() != ".toml":
            raise ScanError(f"the dataset {path} is a file; point data.dataset at the folder of images, or at a "
                            f"dataset .toml")
        scan = Scan(path.parent, "toml", subsets=_read_toml(path, ext, repeats))
    else:
        scan = _folder_layout(path, ext, repeats)
    seen: set[str] = set()
    for subset in scan.subsets:
        name, n = subset.name, 2
        while subset.name in seen:  # two subsets with one folder name would merge in the metadata dicts
            subset.name, n = f"{name} ({n})", n + 1
        seen.add(subset.name)
        _list_subset(subset, scan)
    return scan


def _folder_layout(path: Path, ext: str, repeats: int) -> Scan:
    subfolders = [e for e in _entries(path) if _is_subfolder(e)]
    repeat_folders = [d for d in subfolders if REPEAT_FOLDER.match(d.name)]
    if not repeat_folders:
        scan = Scan(path, "folder", subsets=[Subset(path, path.name, repeats, "", ext)])
        if subfolders:
            scan.warnings.append(f"subfolders not read: {', '.join(d.name for d in subfolders)} (a plain dataset "
                                 f"folder is read without its subfolders; name them like 10_name to make them "
                                 f"repeat folders)")
        return scan
    scan = Scan(path, "repeat folders")
    for folder in subfolders:
        match = REPEAT_FOLDER.match(folder.name)
        if not match:
            scan.warnings.append(f"folder {folder.name} skipped: in a parent of repeat folders every folder needs "
                                 f"the N_name prefix (e.g. 10_{folder.name})")
        elif int(match.group(1)) == 0:
            scan.warnings.append(f"folder {folder.name} skipped: 0 repeats")
        else:
            scan.subsets.append(Subset(folder, folder.name, int(match.group(1)), match.group(2).strip(), ext))
    for entry in _entries(path):
        if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith("."):
            scan.skipped.append((entry, "lies in the parent of the repeat folders; move it into an N_name folder"))
    return scan


def _read_toml(path: Path, default_ext: str, default_repeats: int) -> list[Subset]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScanError(f"cannot read the dataset TOML {path}: {e}") from None
    for key in doc:
        if key not in _TOP_KEYS:
            hint = (" (this looks like a kohya sd-scripts config: copy its [[datasets.subsets]] tables as "
                    "[[subsets]], and set resolution, batch size and caption options in the run config)"
                    if key in ("general", "datasets") else "")
            raise ScanError(f"{path}: unknown key `{key}`; allowed at the top: {', '.join(_TOP_KEYS)}{hint}")
    top_ext = doc.get("caption_extension", default_ext)
    if not isinstance(top_ext, str):
        raise ScanError(f"{path}: `caption_extension` must be a string such as \".txt\", got {top_ext!r}")
    tables = doc.get("subsets")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ScanError(f"{path}: needs at least one [[subsets]] table with an image_dir")
    subsets = []
    for i, table in enumerate(tables, 1):
        where = f"{path}: subset {i}"
        for key in table:
            if key not in _SUBSET_KEYS:
                raise ScanError(f"{where}: unknown key `{key}`; allowed: {', '.join(_SUBSET_KEYS)}")
        image_dir = table.get("image_dir")
        if not isinstance(image_dir, str) or not image_dir:
            raise ScanError(f"{where}: `image_dir` (the folder of images, relative to the TOML) is required")
        folder = Path(os.path.abspath(path.parent / Path(image_dir).expanduser()))
        if not folder.is_dir():
            raise ScanError(f"{where}: image_dir {folder} is not a folder; fix the path (relative to {path.parent})")
        match = REPEAT_FOLDER.match(folder.name)
        repeats = table.get("num_repeats", int(match.group(1)) if match else default_repeats)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ScanError(f"{where}: `num_repeats` must be a whole number ≥ 1, got {repeats!r}")
        class_tokens = table.get("class_tokens", match.group(2).strip() if match else "")
        ext = table.get("caption_extension", top_ext)
        is_reg = table.get("is_reg", False)
        for key, value, kind in (("class_tokens", class_tokens, str), ("caption_extension", ext, str),
                                 ("is_reg", is_reg, bool)):
            if not isinstance(value, kind):
                raise ScanError(f"{where}: `{key}` must be a {'true/false' if kind is bool else 'string'}, "
                                f"got {value!r}")
        subsets.append(Subset(folder, folder.name, repeats, class_tokens, normalise_extension(ext), is_reg))
    return subsets


def _list_subset(subset: Subset, scan: Scan) -> None:
    """Append the subset's candidate images (each with its caption file) and its unreadable kinds of file."""
    entries = [e for e in _entries(subset.folder) if not _is_subfolder(e)]
    by_lower = {e.name.lower(): e for e in entries}
    images: list[Path] = []
    for entry in entries:
        suffix = entry.suffix.lower()
        if entry.name.startswith("._") and suffix in IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS:
            scan.skipped.append((entry, "a macOS metadata file (AppleDouble '._' copy), not an image"))
        elif entry.name.startswith("."):
            continue
        elif suffix in IMAGE_EXTENSIONS:
            images.append(entry)
        elif suffix in UNSUPPORTED_EXTENSIONS:
            scan.skipped.append((entry, f"unsupported file type {suffix}: convert it to png, jpg, webp or bmp"))

    def caption_for(stem: str) -> Path | None:
        for ext in dict.fromkeys((subset.caption_extension, ".caption")):
            found = by_lower.get(f"{stem}{ext}".lower())
            if found is not None and found.is_file():
                return found
        return None

    stems: dict[str, Path] = {}
    for image in images:
        stems[image.stem.lower()] = image
        scan.candidates.append(Candidate(subset, image, caption_for(image.stem)))
    used = {caption_for(image.stem) for image in stems.values()}
    for entry in entries:
        if entry.suffix.lower() not in (subset.caption_extension.lower(), ".caption") or entry in used \
                or entry.name.startswith("."):
            continue
        image = stems.get(entry.stem.lower())
        if image is not None:
            scan.warnings.append(f"{subset.name}: caption {entry.name} is unused: {image.name} reads "
                                 f"{caption_for(image.stem).name}")
        else:
            scan.warnings.append(f"{subset.name}: caption {entry.name} has no image of the same name; it is unused")
