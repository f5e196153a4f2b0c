"""Decoding one image file into the RGB pixels we train on, or a plain-words reason why it cannot be used.

Everything a phone, a scraper or an art program produces is normalised here: EXIF orientation applied,
transparency composited on a background colour, palette / 16-bit / CMYK / greyscale turned into 8-bit RGB.
Pillow's decompression-bomb guard stays on (we never change Image.MAX_IMAGE_PIXELS); a file it refuses is
skipped with a message saying so.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from ..config import ConfigError

# Extensions we read, and Pillow formats we accept behind them (MPO is the multi-picture JPEG of phones/cameras).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP")
# Picture-like extensions users drop in that we do not read: reported as skipped rather than silently ignored.
UNSUPPORTED_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".jp2", ".psd",
                          ".kra", ".clip", ".xcf", ".svg", ".ico", ".tga", ".exr", ".dng", ".cr2", ".nef", ".arw")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageProblem(Exception):
    """Why a file cannot be trained on; str() is the reason shown to the user."""


@dataclass
class DecodedImage:
    image: Image.Image  # mode RGB, orientation applied, transparency composited
    content_hash: str  # sha256 of the file's bytes
    has_alpha: bool  # some pixel was not fully opaque, so the background colour shaped the pixels
    notes: list[str]  # worth a warning, not a reason to skip


def parse_background(value: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ConfigError(f"`data.background` = {value!r} is not a colour; use a name such as white or black, "
                         f"or #rrggbb") from None


def _sniff(data: bytes) -> str:
    """A guess at what a non-image file is, so the reason says more than 'cannot identify'."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML page saved under an image name (a failed download?)"
    if head.startswith(b"%pdf"):
        return "a PDF document, not an image"
    if head.startswith(b"pk\x03\x04"):
        return "a zip archive, not an image"
    if data[:4096] and all(32 <= b < 127 or b in b"\r\n\t" for b in data[:4096]):
        return "a text file, not an image"
    return "not an image Pillow can identify (damaged, or another kind of file under an image name)"


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, bool]:
    """8-bit RGB, with any transparency composited on `background`; also says whether transparency was used."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (and 32-bit) greyscale: Pillow's own convert clips at 255, which would turn most pixels white.
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # an alpha channel that is opaque everywhere changes nothing
            return rgba.convert("RGB"), False
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB"), True
    return img.convert("RGB"), False


def decode_bytes(data: bytes, background: tuple[int, int, int]) -> tuple[Image.Image, bool, list[str]]:
    """Decode fully (a truncated file fails here, not in the middle of training) and normalise to RGB."""
    notes: list[str] = []
    if not data:
        raise ImageProblem("empty file (0 bytes)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageProblem(f"refused by Pillow's decompression-bomb guard ({e}); an image this large is "
                               f"either damaged or far bigger than training needs: downscale it") from None
        except UnidentifiedImageError:
            raise ImageProblem(_sniff(data)) from None
        except Exception as e:  # a damaged header can raise nearly anything; one file must not stop the run
            raise ImageProblem(f"damaged header: {type(e).__name__}: {e}") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            notes.append(f"very large ({img.width}×{img.height} px, past Pillow's decompression-bomb warning "
                         f"threshold); decoded anyway, but a smaller copy would load faster")
    if img.format not in ACCEPTED_FORMATS:
        raise ImageProblem(f"a {img.format} image under an image name; supported formats are png, jpg, webp "
                           f"and bmp: convert it")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":  # MPO's extra frames are the camera's previews, not animation
        notes.append(f"animated ({frames} frames); only the first frame is used")
    try:
        img.load()
    except Exception as e:  # truncated data, bad zlib/JPEG streams, CRC errors ...
        raise ImageProblem(f"damaged or truncated: {e}") from None
    if img.width < 1 or img.height < 1:
        raise ImageProblem(f"has no pixels ({img.width}×{img.height})")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should not cost the picture
        notes.append(f"EXIF orientation unreadable ({e}); used as stored")
    try:
        rgb, has_alpha = _to_rgb(img, background)
    except Exception as e:
        raise ImageProblem(f"cannot convert its {img.mode} pixels to RGB: {e}") from None
    return rgb, has_alpha, notes


def decode_image(path: Path, background: tuple[int, int, int]) -> DecodedImage:
    """Read, hash and decode one file. ImageProblem says why it cannot be used."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageProblem("a folder with an image name, not a file") from None
    except FileNotFoundError:
        raise ImageProblem("cannot be read: the file is missing (a broken link, or deleted during the scan)") from None
    except PermissionError:
        raise ImageProblem("cannot be read: permission denied; check the file's permissions") from None
    except OSError as e:
        raise ImageProblem(f"cannot be read: {e.strerror or e}") from None
    image, has_alpha, notes = decode_bytes(data, background)
    return DecodedImage(image, hashlib.sha256(data).hexdigest(), has_alpha, notes)

