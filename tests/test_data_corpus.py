"""The messy-dataset corpus: every bad case users bring, next to good files of every kind.

make_corpus() is also meant for other tests (the training test trains on it):
    from test_data_corpus import make_corpus, corpus_config
    corpus = make_corpus(tmp_path)             # corpus.good: the paths that must be usable
    ds = load_dataset(corpus_config(corpus), seed=0)
"""
from __future__ import annotations

import codecs
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.config import DataConfig
from trainer.data import DatasetError, dataset_report, load_dataset, run_dataset_command

LONG_CAPTION = ", ".join(["red"] * 60)  # 60 words + 59 commas = 119 CLIP tokens: 44 past the 75-token window


@dataclass
class Corpus:
    root: Path
    good: list[Path] = field(default_factory=list)
    bad: dict[Path, str] = field(default_factory=dict)  # file -> a phrase its skip reason must contain
    captions: dict[Path, str] = field(default_factory=dict)  # good file -> the caption it must get
    warned: dict[str, str] = field(default_factory=dict)  # name -> a phrase of the warning naming it


def pattern(w: int, h: int, seed: int) -> Image.Image:
    """Coloured blocks plus a little noise: compresses like a picture, and each corpus image differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                     np.full_like(xx, (seed * 53) % 256)], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png() -> bytes:
    """A 30000×30000 PNG header with no pixel data: Pillow's bomb guard refuses it before decoding anything."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def make_corpus(root: Path) -> Corpus:
    root = Path(root)
    c = Corpus(root)
    toy = root / "5_sks toy"
    toy.mkdir(parents=True)
    (root / "2_scene").mkdir()

    def good(path: Path, data: bytes, caption: str | None = None, expect: str | None = None,
             caption_bytes: bytes | None = None, caption_ext: str = ".txt"):
        path.write_bytes(data)
        if caption is not None or caption_bytes is not None:
            path.with_suffix(caption_ext).write_bytes(caption_bytes if caption_bytes is not None
                                                      else caption.encode("utf-8"))
        c.good.append(path)
        c.captions[path] = expect if expect is not None else (caption or "")

    def bad(path: Path, data: bytes, reason: str):
        path.write_bytes(data)
        c.bad[path] = reason

    # ---- good files of every kind ----
    good(toy / "plain.png", encode(pattern(80, 64, 1), "PNG"), "sks toy, red, square")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    good(toy / "phone.jpg", encode(pattern(96, 64, 2), "JPEG", exif=exif.tobytes()), None,
         expect="sks toy, on a table", caption_bytes=codecs.BOM_UTF8 + "sks toy, on a table".encode())
    rgba = pattern(64, 64, 3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    good(toy / "cutout.png", encode(rgba, "PNG"), "sks toy, cutout", caption_ext=".caption")
    pal = pattern(48, 64, 4).quantize(16)
    good(toy / "palette.png", encode(pal, "PNG", transparency=0), None, expect="sks toy")  # class text
    grey16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16), "I;16")
    good(toy / "deep.png", encode(grey16, "PNG"), None, expect="sks toy, café",
         caption_bytes="sks toy, café".encode("cp1252"))
    good(toy / "print.jpg", encode(pattern(64, 80, 6).convert("CMYK"), "JPEG"), None, expect="sks toy, print",
         caption_bytes="sks toy, print".encode("utf-16"))
    good(toy / "grey.jpg", encode(pattern(64, 64, 7).convert("L"), "JPEG"),
         "sks toy, grey\nsecond line is ignored", expect="sks toy, grey")
    good(toy / "web.webp", encode(pattern(72, 64, 8), "WEBP", quality=90), "sks toy, web")
    good(toy / "paint.bmp", encode(pattern(64, 72, 9), "BMP"), "sks toy, paint")
    good(toy / "tiny.png", encode(pattern(20, 16, 10), "PNG"), "sks toy, tiny")
    good(toy / "long.png", encode(pattern(64, 64, 11), "PNG"), LONG_CAPTION)
    good(toy / "twin.png", encode(pattern(64, 64, 12), "PNG"), "sks toy, twin")
    good(toy / "twin.jpg", encode(pattern(64, 48, 13), "JPEG"), expect="sks toy, twin")  # shares twin.txt
    good(root / "2_scene" / "scene.png", encode(pattern(96, 48, 14), "PNG"), "a scene, wide")
    c.warned.update({"twin.png": "share the name", "deep.png": "Windows-1252", "print.jpg": "UTF-16",
                     "long.png": "44 are cut off", "notes": "skipped", "0_zero": "0 repeats",
                     "tiny.png": "enlarged"})

    # ---- bad files, each with the phrase its reason must contain ----
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    png, jpg = encode(noise, "PNG"), encode(noise, "JPEG")
    bad(toy / "cut.png", png[: len(png) // 2], "truncated")
    bad(toy / "cut.jpg", jpg[: len(jpg) // 2], "truncated")
    bad(toy / "scrambled.png", png[:200] + bytes(b ^ 0xFF for b in png[200:400]) + png[400:], "damaged")
    bad(toy / "empty.png", b"", "empty file")
    bad(toy / "readme.jpg", b"These are my training pictures.\n", "text file")
    bad(toy / "download.webp", b"<!DOCTYPE html><html><body>404</body></html>", "HTML page")
    bad(toy / "bomb.png", bomb_png(), "decompression-bomb")
    bad(toy / "really.png", encode(noise, "GIF"), "GIF image")
    bad(toy / "anim.gif", encode(noise, "GIF"), "unsupported file type .gif")
    bad(toy / "._plain.png", b"\x00\x05\x16\x07" + bytes(60), "AppleDouble")
    (toy / "folder.png").mkdir()
    c.bad[toy / "folder.png"] = "a folder"
    os.symlink(toy / "gone.png", toy / "dangling.png")
    c.bad[toy / "dangling.png"] = "missing"
    bad(root / "loose.png", encode(pattern(64, 64, 15), "PNG"), "move it into an N_name folder")

    # ---- layout cases: a folder without the N_ prefix, and one with 0 repeats ----
    (root / "notes").mkdir()
    (root / "notes" / "x.png").write_bytes(encode(pattern(64, 64, 16), "PNG"))
    (root / "0_zero").mkdir()
    (root / "0_zero" / "z.png").write_bytes(encode(pattern(64, 64, 17), "PNG"))
    return c


def corpus_config(corpus: Corpus, **overrides) -> DataConfig:
    """Small buckets, so a training test on the corpus stays fast."""
    values = dict(dataset=str(corpus.root), resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32)
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def loaded(corpus):
    return load_dataset(corpus_config(corpus), seed=0)


def test_usable_set_is_exactly_the_good_files(corpus, loaded):
    assert sorted(r.path for r in loaded.images) == sorted(corpus.good)
    assert loaded.report.usable


def test_every_bad_file_is_named_with_its_reason(corpus, loaded):
    skipped = dict(loaded.report.skipped)
    assert set(skipped) == set(corpus.bad)
    for path, phrase in corpus.bad.items():
        assert phrase in skipped[path], (path.name, skipped[path])
    lines = "\n".join(loaded.report.lines())
    for path in corpus.bad:  # the printed report names every file, relative to the dataset root
        assert str(path.relative_to(corpus.root)) in lines


def test_captions_from_every_encoding_and_source(corpus, loaded):
    got = {r.path: r.caption for r in loaded.images}
    assert got == corpus.captions
    assert sorted(loaded.report.missing_captions) == sorted(p for p, cap in corpus.captions.items()
                                                            if p.name == "palette.png")


def test_warnings_name_the_files(corpus, loaded):
    warnings = loaded.report.warnings
    for name, phrase in corpus.warned.items():
        assert any(name in w and phrase in w for w in warnings), (name, phrase, warnings)
    twin = next(w for w in warnings if "share the name" in w)
    assert "twin.jpg" in twin and "twin.png" in twin and "twin.txt" in twin
    assert [(p.name, n, lost) for p, n, lost in loaded.report.long_captions] == [("long.png", 119, 44)]


def test_folders_repeats_and_metadata(corpus, loaded):
    folders = {f.name: (f.images, f.repeats) for f in loaded.report.folders}
    assert folders == {"5_sks toy": (13, 5), "2_scene": (1, 2)}
    assert loaded.report.draws_per_epoch == 13 * 5 + 2 == loaded.batches_per_epoch(1)
    assert loaded.dataset_dirs == {"5_sks toy": {"n_repeats": 5, "img_count": 13},
                                   "2_scene": {"n_repeats": 2, "img_count": 1}}
    freq = loaded.tag_frequency
    assert freq["2_scene"] == {"a scene": 1, "wide": 1}
    # every caption but long.png's names the class; "red" is counted once per caption that has it
    assert freq["5_sks toy"]["sks toy"] == 12 and freq["5_sks toy"]["red"] == 2
    info = loaded.bucket_info
    assert sum(b["count"] for b in info["buckets"].values()) == loaded.report.draws_per_epoch
    assert sum(loaded.report.buckets.values()) == 14


def test_report_of_a_path_and_the_command(corpus, capsys):
    report = dataset_report(corpus.root)  # default 512 buckets: same files, same verdicts
    assert report.usable and len(report.skipped) == len(corpus.bad)
    assert run_dataset_command(corpus.root, resolution=64, min_bucket_reso=32, bucket_step=32) == 0
    out = capsys.readouterr().out
    assert "Usable: yes" in out and "cut.png: damaged or truncated" in out
    assert run_dataset_command(corpus.root, resoluton=64) == 2  # a typo in an option is named
    assert "resoluton" in capsys.readouterr().err


def test_nothing_usable_stops_with_the_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("not a picture")
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(dataset=str(tmp_path)), 0)
    assert f"none of the 2 image files in {tmp_path} can be used" in str(err.value)
    assert {p.name for p, _ in err.value.report.skipped} == {"a.png", "b.jpg"}
    assert run_dataset_command(tmp_path) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    report = dataset_report(empty)
    assert not report.usable and "no images found" in report.reason
    assert not dataset_report(tmp_path / "missing").usable


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without read permission")
def test_unreadable_file_is_skipped(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode(pattern(64, 64, 1), "PNG"))
    locked = tmp_path / "locked.png"
    locked.write_bytes(encode(pattern(64, 64, 2), "PNG"))
    locked.chmod(0)
    try:
        report = dataset_report(tmp_path)
    finally:
        locked.chmod(0o644)
    assert report.usable and dict(report.skipped)[locked].startswith("cannot be read: permission denied")
