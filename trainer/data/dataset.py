"""The training dataset: every image decoded and checked once, up front, then drawn epoch by epoch.

    ds = load_dataset(cfg.data, seed)          # DatasetError (a ValueError) if nothing usable, saying why
    for batch in ds.epoch_batches(epoch, global_batch):
        for draw in batch: pixels, (top, left) = ds.load_pixels(draw)

Everything random (the order, flips, caption shuffle/dropout, crop positions) is a pure function of
(seed, epoch), so every process of a multi-GPU run computes the same global batches and takes its slice.
"""
from __future__ import annotations

import copy
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig, validate_data
from ..errors import StudioError
from .buckets import BucketError, Bucketer, cover_size, crop_offsets
from .captions import (CaptionProblem, CaptionTricks, apply_trigger, caption_lines,
                       clip_overflow, count_tags, read_caption)
from .images import IMAGE_EXTENSIONS, ImageProblem, decode_image, parse_background
from .report import DatasetError, DatasetReport, FolderSummary
from .scan import Candidate, Scan, scan_dataset

PIXEL_CACHE_BYTES = 512 * 2**20  # resized images kept in memory so repeats do not decode the file again
UPSCALE_WARNING = 2.0  # an image enlarged more than this looks soft; say so
CROP_WARNING = 0.25  # warn when the bucket crop throws away more than this share of the picture
TOP_TAGS = 15


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str  # the caption file's text (or the class text), trigger word applied; "\n" between lines
    bucket: tuple[int, int]  # (w, h) the image is trained at
    original_size: tuple[int, int]  # (w, h) after EXIF orientation
    repeats: int  # draws per epoch (regularisation images may be raised to balance the training images)
    is_reg: bool
    loss_weight: float  # data.prior_loss_weight for regularisation images, else 1
    folder: str  # the subset's name (key of tag_frequency / dataset_dirs)
    content_hash: str  # sha256 of the file's bytes
    background: str = ""  # "#rrggbb" its transparent pixels were composited on ("" if opaque): shapes the pixels
    has_caption: bool = True  # False: trained on the class text / trigger word


@dataclass(frozen=True)
class Draw:
    image: int  # index into Dataset.images
    flip: bool
    caption: str  # after shuffle / dropout
    crop_seed: int  # random crop position (unused with centre crop)


class Dataset:
    def __init__(self, images: list[ImageRecord], report: DatasetReport, cfg: DataConfig, seed: int):
        self.images = images
        self.report = report
        self.seed = seed
        self.cfg = copy.deepcopy(cfg)  # later edits of the caller's config must not change a loaded dataset
        self.tricks = CaptionTricks(cfg.trigger_word, cfg.shuffle_tags, cfg.keep_tokens, cfg.caption_dropout,
                                    cfg.tag_dropout, cfg.caption_lines == "random")
        self._background = parse_background(cfg.background)
        self._pixels: dict[int, Image.Image] = {}
        self._pixel_bytes = 0

    # ---- what the training loop asks -------------------------------------------------------------------------
    @property
    def captions_fixed(self) -> bool:
        return self.tricks.fixed

    @property
    def random_crop(self) -> bool:
        return self.cfg.crop == "random"

    def batches_per_epoch(self, global_batch: int = 1) -> int:
        """len(epoch_batches(e, global_batch)) without drawing them: each bucket's draws in full batches."""
        per_bucket = Counter()
        for record in self.images:
            per_bucket[record.bucket] += record.repeats
        return sum(math.ceil(n / global_batch) for n in per_bucket.values())

    def epoch_batches(self, epoch: int, global_batch: int) -> list[list[Draw]]:
        """Every image `repeats` times; one bucket per batch; full batches (a bucket's last batch wraps around
        within the bucket); a pure function of (seed, epoch)."""
        if global_batch < 1:
            raise ValueError(f"global_batch must be ≥ 1, got {global_batch}")
        rng = random.Random(f"lora-studio/data/{self.seed}/{epoch}")
        slots: dict[tuple[int, int], list[int]] = {}
        for i, record in enumerate(self.images):
            slots.setdefault(record.bucket, []).extend([i] * record.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(slots):
            order = slots[bucket]
            rng.shuffle(order)
            # Fill the last batch by wrapping around the bucket's images (spread evenly, not the first few slots).
            members = sorted(set(order))
            rng.shuffle(members)
            order += [members[k % len(members)] for k in range(-len(order) % global_batch)]
            batches += [order[k:k + global_batch] for k in range(0, len(order), global_batch)]
        rng.shuffle(batches)
        return [[self._draw(i, rng.getrandbits(64)) for i in batch] for batch in batches]

    def _draw(self, index: int, draw_seed: int) -> Draw:
        # One rng per draw, consumed in a fixed order: turning flips on does not change the captions.
        rng = random.Random(draw_seed)
        flip = rng.random() < 0.5 and self.cfg.flip
        crop_seed = rng.getrandbits(32)
        return Draw(index, flip, self.tricks.apply(self.images[index].caption, rng), crop_seed)

    def crop_top_left(self, draw: Draw) -> tuple[int, int]:
        """(top, left) of the crop in the resized image, as SDXL's conditioning wants it (mirrored for a flip);
        known without decoding, so the latent cache key can be made before any pixels are loaded."""
        record = self.images[draw.image]
        resized = cover_size(record.original_size, record.bucket)
        top, left = crop_offsets(resized, record.bucket, self.cfg.crop, draw.crop_seed)
        if draw.flip:
            left = resized[0] - record.bucket[0] - left
        return top, left

    def load_pixels(self, draw: Draw) -> tuple[torch.Tensor, tuple[int, int]]:
        """FloatTensor[3, H, W] in [-1, 1] at the bucket size, and the crop's (top, left)."""
        record = self.images[draw.image]
        resized = self._resized(draw.image)
        top, left = crop_offsets(resized.size, record.bucket, self.cfg.crop, draw.crop_seed)
        (bw, bh) = record.bucket
        img = resized.crop((left, top, left + bw, top + bh))
        if draw.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
        return pixels, self.crop_top_left(draw)

    def _resized(self, index: int) -> Image.Image:
        cached = self._pixels.get(index)
        if cached is not None:
            return cached
        record = self.images[index]
        try:
            decoded = decode_image(record.path, self._background)
        except ImageProblem as e:
            raise DatasetError(f"{record.path} was fine when the dataset was checked but now {e}; restore it or "
                               f"start the training again") from None
        if decoded.content_hash != record.content_hash:
            raise DatasetError(f"{record.path} changed after the dataset was checked; start the training again "
                               f"so that it is checked (and its cached latents renewed)")
        size = cover_size(record.original_size, record.bucket)
        img = decoded.image
        if img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if self._pixel_bytes + size[0] * size[1] * 3 <= PIXEL_CACHE_BYTES:
            self._pixels[index] = img
            self._pixel_bytes += size[0] * size[1] * 3
        return img

    # ---- metadata (kohya's ss_* shapes) ----------------------------------------------------------------------
    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for folder in self.report.folders:
            out[folder.name] = dict(count_tags(r.caption for r in self.images if r.folder == folder.name))
        return out

    def _dirs(self, is_reg: bool) -> dict[str, dict[str, int]]:
        return {f.name: {"n_repeats": f.repeats, "img_count": f.images} for f in self.report.folders
                if f.is_reg == is_reg}

    @property
    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        return self._dirs(False)

    @property
    def reg_dataset_dirs(self) -> dict[str, dict[str, int]]:
        return self._dirs(True)

    @property
    def bucket_info(self) -> dict:
        draws = Counter()
        for record in self.images:
            draws[record.bucket] += record.repeats
        errors = [abs(r.bucket[0] / r.bucket[1] - r.original_size[0] / r.original_size[1]) for r in self.images]
        return {"buckets": {i: {"resolution": list(b), "count": draws[b]} for i, b in enumerate(sorted(draws))},
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def _check_settings(cfg: DataConfig) -> tuple[tuple[int, int, int], Bucketer]:
    validate_data(cfg)  # a ConfigError: the report carries it like a scan error
    return parse_background(cfg.background), Bucketer(cfg.resolution, *cfg.bucket_range(), cfg.bucket_step,
                                                     cfg.no_upscale)


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Scan, decode and check every image; DatasetError (with .report) when nothing usable remains."""
    report = DatasetReport(source=cfg.dataset)
    try:
        background, bucketer = _check_settings(cfg)
        scan = scan_dataset(cfg.dataset, cfg.caption_extension, cfg.repeats)
    except StudioError as e:
        report.reason = str(e)
        raise DatasetError(str(e), report) from None
    report.root = scan.root
    report.skipped += scan.skipped
    report.warnings += scan.warnings
    records = _check_images(scan, cfg, background, bucketer, report)
    records = _balance_regularisation(records, report)
    _summarise(scan, records, report)
    if not any(not r.is_reg for r in records):
        report.reason = _why_unusable(scan, records)
        raise DatasetError(report.reason, report)
    report.usable = True
    return Dataset(records, report, cfg, seed)


def _check_images(scan: Scan, cfg: DataConfig, background: tuple[int, int, int], bucketer: Bucketer,
                  report: DatasetReport) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    used: list[Candidate] = []
    warn = report.warnings.append
    for cand in scan.candidates:
        name = report.display_name(cand.path)
        try:
            decoded = decode_image(cand.path, background)
            size = decoded.image.size
            choice = bucketer.select(*size)
        except (ImageProblem, BucketError) as e:
            report.skipped.append((cand.path, str(e)))
            continue
        for note in decoded.notes:
            warn(f"{name}: {note}")
        text = ""
        if cand.caption_path is not None:
            try:
                raw, note = read_caption(cand.caption_path)
                text = caption_lines(raw, cfg.caption_lines)
                if note:
                    warn(f"{name}: {note}")
            except CaptionProblem as e:
                warn(f"{name}: {e}; it is trained on the class text")
        if not text:
            report.missing_captions.append(cand.path)
        caption = apply_trigger(text or cand.subset.class_tokens, cfg.trigger_word)
        if not caption:
            warn(f"{name}: no caption, no class text and no trigger word: it is trained on an empty caption")
        resized = cover_size(size, choice.bucket)
        scale = resized[0] / size[0]
        if scale > UPSCALE_WARNING:
            warn(f"{name}: {size[0]}×{size[1]} px is enlarged {scale:.1f}× to fill its {choice.bucket[0]}×"
                 f"{choice.bucket[1]} bucket and will look soft (use a larger image, or set data.no_upscale)")
        cropped = 1 - choice.bucket[0] * choice.bucket[1] / (resized[0] * resized[1])
        if cropped > CROP_WARNING:
            warn(f"{name}: aspect ratio {size[0] / size[1]:.2f} is far from every bucket; cropping to "
                 f"{choice.bucket[0]}×{choice.bucket[1]} loses {cropped:.0%} of the picture")
        records.append(ImageRecord(
            path=cand.path, caption=caption, bucket=choice.bucket, original_size=size,
            repeats=cand.subset.repeats, is_reg=cand.subset.is_reg,
            loss_weight=cfg.prior_loss_weight if cand.subset.is_reg else 1.0, folder=cand.subset.name,
            content_hash=decoded.content_hash,
            background="#%02x%02x%02x" % background if decoded.has_alpha else "", has_caption=bool(text)))
        used.append(cand)
    _warn_shared_stems(used, report)
    by_hash: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_hash.setdefault(record.content_hash, []).append(record)
    for same in by_hash.values():
        if len(same) > 1:
            warn(f"identical files: {', '.join(report.display_name(r.path) for r in same)} (all are used)")
    _check_caption_lengths(records, report)
    return records


def _warn_shared_stems(used: list[Candidate], report: DatasetReport) -> None:
    """a.png + a.jpg: both are trained, and both read a.txt; say so, since the user may expect otherwise."""
    groups: dict[tuple[Path, str], list[Candidate]] = {}
    for cand in used:
        groups.setdefault((cand.path.parent, cand.path.stem.lower()), []).append(cand)
    for group in groups.values():
        if len(group) > 1:
            names = " and ".join(report.display_name(c.path) for c in group)
            caption = group[0].caption_path
            what = (f"both get the caption in {caption.name}" if caption else
                    "neither has a caption file, both get the class text")
            report.warnings.append(f"{names} share the name {group[0].path.stem!r}: {what}; rename one to give "
                                   f"it a caption of its own")


def _check_caption_lengths(records: list[ImageRecord], report: DatasetReport) -> None:
    counted: dict[str, tuple[int, int, str]] = {}
    for record in records:
        if not record.caption:
            continue
        if record.caption not in counted:
            counted[record.caption] = clip_overflow(record.caption)
        tokens, lost, lost_text = counted[record.caption]
        if lost:
            report.long_captions.append((record.path, tokens, lost))
            snippet = lost_text if len(lost_text) <= 60 else lost_text[:57] + "..."
            report.warnings.append(f"{report.display_name(record.path)}: caption is {tokens} CLIP tokens; the last "
                                   f"{lost} are cut off (CLIP reads 75): {snippet!r}")


def _balance_regularisation(records: list[ImageRecord], report: DatasetReport) -> list[ImageRecord]:
    """kohya's prior preservation: regularisation images are repeated (round robin) until they are drawn as often
    per epoch as the training images."""
    reg = [i for i, r in enumerate(records) if r.is_reg]
    train_draws = sum(r.repeats for r in records if not r.is_reg)
    reg_draws = sum(records[i].repeats for i in reg)
    if not reg or not train_draws or reg_draws >= train_draws:
        return records
    repeats = {i: records[i].repeats for i in reg}
    for k in range(train_draws - reg_draws):
        repeats[reg[k % len(reg)]] += 1
    report.warnings.append(f"regularisation images are repeated more to match the {train_draws} training draws per "
                           f"epoch ({reg_draws} → {train_draws}), as kohya does")
    return [replace(r, repeats=repeats[i]) if i in repeats else r for i, r in enumerate(records)]


def _summarise(scan: Scan, records: list[ImageRecord], report: DatasetReport) -> None:
    for subset in scan.subsets:
        mine = [r for r in records if r.folder == subset.name]
        report.folders.append(FolderSummary(subset.name, subset.folder, subset.repeats, subset.class_tokens,
                                            subset.is_reg, len(mine), sum(r.repeats for r in mine)))
    for record in records:
        report.buckets[record.bucket] = report.buckets.get(record.bucket, 0) + 1
    report.draws_per_epoch = sum(r.repeats for r in records)
    report.top_tags = count_tags(r.caption for r in records if not r.is_reg).most_common(TOP_TAGS)


def _why_unusable(scan: Scan, records: list[ImageRecord]) -> str:
    if records:
        return f"only regularisation images are usable in {scan.root}; at least one training image is needed"
    if scan.candidates:
        n = len(scan.candidates)
        return f"none of the {n} image file{'s' * (n != 1)} in {scan.root} can be used; see the skipped files for why"
    if scan.kind == "repeat folders" and not scan.subsets:
        return f"no usable N_name repeat folder in {scan.root}"
    return f"no images found in {scan.root} (looked for {', '.join(IMAGE_EXTENSIONS)})"
