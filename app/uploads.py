"""A dataset folder written from the browser: uploads (files or a zip) and caption edits.

An upload can only ever write inside its dataset folder: every incoming name (a file name or a zip entry) is
reduced to a plain file name (directories, "..", drive letters and absolute paths are dropped, odd characters
replaced), and the final path is checked to sit directly in the folder before anything is written.
Decoding and checking the images is the engine's job (the dataset report); here only the extension is checked.
"""
from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from trainer.atomic import atomic_path, write_text
from trainer.data.captions import CaptionProblem, apply_trigger, has_trigger
from trainer.data.captions import read_caption as engine_read_caption
from trainer.data.images import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # what the engine decodes

from app.errors import UserError

CAPTION_SUFFIXES = (".txt", ".caption")
MAX_ZIP_BYTES = 4 << 30  # uncompressed total; a zip bomb is refused before anything is written
MAX_ZIP_FILES = 20_000


@dataclass
class UploadResult:
    saved: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name as uploaded, why)

    def message(self) -> str:
        lines = [f"Saved {len(self.saved)} file(s)."]
        lines += [f"Ignored {name}: {why}" for name, why in self.ignored]
        return "\n".join(lines)


def safe_file_name(name: str) -> str:
    """The plain file name to store an uploaded `name` under, or UserError saying why it is refused."""
    base = PurePosixPath(name.replace("\\", "/")).name  # drops folders, "..", "/abs" and "C:/x" prefixes
    base = base.split(":")[-1]  # "C:x.png" has no slash but still names a drive
    base = re.sub(r"[^\w\-. ()+@&,']", "_", base).strip(" .")  # no leading dots: no hidden files, no ".."
    if not base or base.startswith("."):
        raise UserError("not a usable file name")
    return base


def _kind(name: str) -> str | None:
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in CAPTION_SUFFIXES:
        return "caption"
    return None


def _target(dataset_dir: Path, name: str) -> Path:
    target = (dataset_dir / name).resolve()
    if target.parent != dataset_dir.resolve():  # belt and braces after safe_file_name
        raise UserError("would be written outside the dataset folder")
    return target


class _Namer:
    """Unique stems within one upload, keyed by (source folder, stem) so a caption follows its image:
    a zip holding a/1.png, a/1.txt, b/1.png, b/1.txt gives 1.png 1.txt 1_1.png 1_1.txt."""

    def __init__(self):
        self.stems: dict[tuple[str, str], str] = {}
        self.taken: set[str] = set()

    def name(self, folder: str, safe: str) -> str:
        stem, suffix = Path(safe).stem, Path(safe).suffix
        key = (folder, stem.lower())
        if key not in self.stems:
            unique, i = stem, 0
            while unique.lower() in self.taken:
                i += 1
                unique = f"{stem}_{i}"
            self.taken.add(unique.lower())
            self.stems[key] = unique
        return self.stems[key] + suffix


def _store(dataset_dir: Path, name: str, folder: str, namer: _Namer, result: UploadResult, write) -> None:
    try:
        safe = safe_file_name(name)
    except UserError as e:
        result.ignored.append((name, str(e)))
        return
    if _kind(safe) is None:
        result.ignored.append((name, f"not an image ({', '.join(IMAGE_SUFFIXES)}) or a caption (.txt)"))
        return
    target = _target(dataset_dir, namer.name(folder, safe))
    with atomic_path(target) as tmp:
        write(tmp)
    result.saved.append(target.name)


def _store_zip(dataset_dir: Path, zip_path: Path, namer: _Namer, result: UploadResult) -> None:
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise UserError(f"{zip_path.name} is not a readable zip file ({e}); upload the images directly") from e
    with archive:
        entries = [e for e in archive.infolist() if not e.is_dir()]
        if len(entries) > MAX_ZIP_FILES or sum(e.file_size for e in entries) > MAX_ZIP_BYTES:
            raise UserError(f"{zip_path.name} holds more than {MAX_ZIP_FILES} files or {MAX_ZIP_BYTES >> 30} GB "
                             "uncompressed; split it into smaller zips")
        for entry in entries:
            posix = entry.filename.replace("\\", "/")
            if posix.startswith("__MACOSX/") or PurePosixPath(posix).name.startswith("."):
                continue  # macOS resource forks and hidden files are not part of the dataset
            folder = str(PurePosixPath(posix).parent)

            def write(tmp: Path, entry=entry) -> None:
                with archive.open(entry) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            _store(dataset_dir, entry.filename, folder, namer, result, write)


def save_uploads(files: list[str | Path], dataset_dir: Path) -> UploadResult:
    """Copy uploaded files (images, captions, zips of them) into dataset_dir, flat."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    result, namer = UploadResult(), _Namer()
    for file in files:
        path = Path(file)
        if path.suffix.lower() == ".zip":
            _store_zip(dataset_dir, path, namer, result)
        else:
            _store(dataset_dir, path.name, "", namer, result, lambda tmp, src=path: shutil.copyfile(src, tmp))
    return result


# ---- captions ---------------------------------------------------------------------------------------------

def caption_path(image: Path) -> Path:
    """The caption file of an image: <stem>.txt, or an existing <stem>.caption when there is no .txt."""
    txt = image.with_suffix(".txt")
    caption = image.with_suffix(".caption")
    return caption if caption.exists() and not txt.exists() else txt


def list_images(dataset_dir: Path) -> list[Path]:
    if not dataset_dir.is_dir():
        return []
    return sorted((p for p in dataset_dir.iterdir() if p.is_file() and _kind(p.name) == "image"),
                  key=lambda p: p.name.lower())


def read_caption(image: Path) -> str:
    """The caption as training reads it (the engine's reader: UTF-8, UTF-16, Windows-1252, Latin-1)."""
    path = caption_path(image)
    if not path.exists():
        return ""
    try:
        return engine_read_caption(path)[0].strip()
    except CaptionProblem as e:
        raise UserError(f"{e}: check the file's permissions") from e


def write_caption(image: Path, text: str) -> None:
    write_text(caption_path(image), text.strip() + "\n")


def add_trigger_word(dataset_dir: Path, word: str) -> int:
    """The engine's rule (trainer.data.captions.apply_trigger, as `data.trigger_word` applies it in training):
    `word, ` before every caption line that does not hold it already; returns how many captions changed."""
    word = word.strip().strip(",").strip()
    if not word:
        raise UserError("the trigger word is empty: type a rare word such as `sks style` first")
    changed = 0
    for image in list_images(dataset_dir):
        caption = read_caption(image)
        if caption and all(has_trigger(line, word) for line in caption.split("\n")):
            continue
        write_caption(image, apply_trigger(caption, word))
        changed += 1
    return changed


def find_replace(dataset_dir: Path, find: str, replace: str) -> int:
    """Plain-text replace in every caption; returns how many captions changed."""
    if not find:
        raise UserError("the text to find is empty: type the word or phrase to replace")
    changed = 0
    for image in list_images(dataset_dir):
        caption = read_caption(image)
        if find in caption:
            write_caption(image, caption.replace(find, replace))
            changed += 1
    return changed
