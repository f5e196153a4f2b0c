"""Aspect-ratio buckets, with kohya sd-scripts' parameters and choices.

Images are not squashed into one square: each goes to the bucket (w, h) whose aspect ratio is closest to its own,
is resized so that it covers the bucket, and is cropped to it. Every bucket has at most resolution² pixels and
sides that are multiples of `step` (the VAE downsamples by 8 and the UNet by another 8, hence 64; SDXL tolerates 32).

Two modes, as in kohya:
- upscale (default): the predefined buckets of make_bucket_resolutions; small images are scaled up to fill one.
- no_upscale: an image is never enlarged. One under the pixel budget gets a bucket of its own size rounded down
  to the step (kohya); a larger one gets the closest-aspect predefined bucket that fits inside it (or, for an
  aspect beyond the predefined range, the closest-aspect step-multiple size inside the image and the budget).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import StudioError


class BucketError(StudioError):
    """Bucket parameters that cannot work together; the message names the setting and the fix."""


def make_bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket list: the square, plus for each width from min_reso to max_reso (every `step`) the tallest
    height that keeps w*h within resolution², and the same rotated. Sorted (w, h) pairs."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // step) * step)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]  # (w, h) the image is trained at
    ar_error: float  # bucket aspect ratio minus the image's (kohya's sign convention)


class Bucketer:
    """Chooses a bucket for an image size; the same parameters always give the same choice."""

    def __init__(self, resolution: int, min_reso: int, max_reso: int, step: int, no_upscale: bool):
        if step <= 0:
            raise BucketError(f"`data.bucket_step` must be positive (64, or 32 for SDXL), got {step}")
        for key, value in (("data.resolution", resolution), ("data.min_bucket_reso", min_reso),
                           ("data.max_bucket_reso", max_reso)):
            if value <= 0 or value % step:
                raise BucketError(f"`{key}` = {value} must be a positive multiple of `data.bucket_step` ({step})")
        if not min_reso <= resolution <= max_reso:
            raise BucketError(f"`data.resolution` ({resolution}) must lie between `data.min_bucket_reso` ({min_reso}) "
                              f"and `data.max_bucket_reso` ({max_reso}); move min_bucket_reso or max_bucket_reso")
        self.resolution, self.min_reso, self.max_reso, self.step = resolution, min_reso, max_reso, step
        self.no_upscale = no_upscale
        self.max_area = resolution * resolution
        self.predefined = make_bucket_resolutions(resolution, min_reso, max_reso, step)
        self._predefined_set = set(self.predefined)

    def select(self, width: int, height: int) -> BucketChoice:
        """The bucket for an image of this size. ValueError if no_upscale leaves it no bucket at all."""
        aspect = width / height
        if not self.no_upscale:
            if (width, height) in self._predefined_set:
                bucket = (width, height)
            else:  # the closest aspect ratio; ties go to the first (smallest width) bucket, as in kohya
                bucket = min(self.predefined, key=lambda b: abs(b[0] / b[1] - aspect))
        else:
            bucket = self._no_upscale_bucket(width, height, aspect)
        return BucketChoice(bucket, bucket[0] / bucket[1] - aspect)

    def _no_upscale_bucket(self, width: int, height: int, aspect: float) -> tuple[int, int]:
        if width * height <= self.max_area:
            # Within the budget: its own size rounded down to the step (kohya), each side capped at max_bucket_reso.
            bw = min(width - width % self.step, self.max_reso)
            bh = min(height - height % self.step, self.max_reso)
            if bw < self.step or bh < self.step:
                raise BucketError(f"too small for no_upscale: {width}×{height} px has a side under {self.step} px; "
                                 f"use a larger image or turn off data.no_upscale")
            return bw, bh
        # Larger: the closest-aspect predefined bucket that fits inside the image needs no enlarging. (kohya shrinks
        # to the budget and floors both sides, which turns a 1000×999 photo into 512×448.)
        fitting = [b for b in self.predefined if b[0] <= width and b[1] <= height]
        if not fitting:  # an aspect beyond the predefined range: any step-multiple size inside image and budget
            fitting = [(bw, bh) for bw in range(self.step, min(width, self.max_reso) + 1, self.step)
                       for bh in range(self.step, min(height, self.max_reso) + 1, self.step)
                       if bw * bh <= self.max_area]
        if not fitting:
            raise BucketError(f"too thin for no_upscale: {width}×{height} px has a side under {self.step} px; "
                             f"use a larger image or turn off data.no_upscale")
        return min(fitting, key=lambda b: (abs(b[0] / b[1] - aspect), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The resize (aspect kept) that just covers the bucket: one side equals the bucket's, the other overhangs."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def crop_offsets(resized: tuple[int, int], bucket: tuple[int, int], mode: str, crop_seed: int) -> tuple[int, int]:
    """(top, left) of the bucket-sized window inside the resized image: centred, or drawn from crop_seed."""
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "random":
        rng = random.Random(crop_seed)
        left = rng.randint(0, spare_w)
        return rng.randint(0, spare_h), left
    return spare_h // 2, spare_w // 2
