"""XY grids: one picture per (row, column), each axis varying a LoRA's weight, the LoRA, the prompt or the seed.

Every picture of the grid is rendered through Generator.generate_batch (trainer/batched_mix.py): the pictures
differ in their mixes, prompts and seeds but share steps, CFG, size and sampler, so they run together.

Axis kinds (the CLI's `--grid KIND[:LORA]=V1,V2,…`, the Gallery's XY grid):
  weight:LORA   that LoRA's UNet and text-encoder weight (added to the mix when absent)
  unet:LORA     its UNet weight only;  te:LORA  its text-encoder weight only
  lora          one LoRA per value, FILE_OR_NAME[:WEIGHT] (`none`: no LoRA from this axis)
  prompt        whole prompts, separated by `|` (prompts hold commas)
  sr            A1111's prompt search/replace: the first value is found in the prompt and replaced by each value
  seed          seeds
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from .batched_mix import Picture
from .errors import StudioError
from .generate import LoraSpec

KINDS = ("weight", "unet", "te", "lora", "prompt", "sr", "seed")
WEIGHT_KINDS = ("weight", "unet", "te")


class GridError(StudioError):
    """An axis that cannot be built; the message names the value and the fix."""


@dataclass
class Axis:
    kind: str
    values: list  # floats (weight kinds), LoraSpec | None (lora), str (prompt, sr), int (seed)
    lora: str = ""  # the LoRA file of the weight kinds

    def labels(self) -> list[str]:
        name = Path(self.lora).stem
        if self.kind in WEIGHT_KINDS:
            what = {"weight": "", "unet": " UNet", "te": " TE"}[self.kind]
            return [f"{name}{what} {v:g}" for v in self.values]
        if self.kind == "lora":
            return ["no LoRA" if v is None else f"{Path(v.path).stem} {v.unet_weight:g}" for v in self.values]
        if self.kind == "seed":
            return [f"seed {v}" for v in self.values]
        return [str(v) for v in self.values]

    def apply(self, picture: Picture, value) -> Picture:
        """The picture with this axis at `value`."""
        if self.kind == "seed":
            return replace(picture, seed=int(value))
        if self.kind == "prompt":
            return replace(picture, prompt=value)
        if self.kind == "sr":
            return replace(picture, prompt=picture.prompt.replace(self.values[0], value))
        if self.kind == "lora":
            if value is None:
                return picture
            return replace(picture, loras=[s for s in picture.loras if not _same(s.path, value.path)] + [value])
        current = next((s for s in picture.loras if _same(s.path, self.lora)), None)
        unet_w, te_w = current.weights() if current else (0.0, 0.0)
        unet_w = value if self.kind in ("weight", "unet") else unet_w
        te_w = value if self.kind in ("weight", "te") else te_w
        rest = [s for s in picture.loras if not _same(s.path, self.lora)]
        return replace(picture, loras=rest + [LoraSpec(self.lora, unet_w, te_w)])


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def make_axis(kind: str, values: list, lora: str = "", prompt: str = "") -> Axis:
    """An axis from already-split values (the UI's fields; parse_axis for the CLI's text). Checks every value."""
    if kind not in KINDS:
        raise GridError(f"unknown grid axis {kind!r}: use one of {', '.join(KINDS)}")
    if not values:
        raise GridError(f"the {kind} axis has no values: give at least one")
    if len(values) > 16:
        raise GridError(f"the {kind} axis has {len(values)} values: use at most 16 per axis")
    if kind in WEIGHT_KINDS:
        if not lora:
            raise GridError(f"the {kind} axis needs a LoRA: write {kind}:FILE_OR_NAME=0,0.5,1")
        values = [_number(v, kind, float) for v in values]
        if any(not -4 <= v <= 4 for v in values):
            raise GridError(f"the {kind} axis' weights {values} must lie between -4 and 4")
    elif kind == "seed":
        values = [_number(v, kind, int) for v in values]
    elif kind == "sr" and values[0] not in prompt:
        raise GridError(f"search/replace: {values[0]!r} (the first value) is not in the prompt {prompt!r}; "
                        "the first value must be a piece of the prompt")
    return Axis(kind, values, lora)


def _number(value, kind: str, cast):
    try:
        return cast(value) if not isinstance(value, str) else cast(value.strip())
    except ValueError:
        raise GridError(f"the {kind} axis' value {value!r} is not a{'n integer' if cast is int else ' number'}: "
                        f"write them like {'1, 2, 3' if cast is int else '0, 0.5, 1'}") from None


def parse_axis(text: str, resolve, prompt: str = "") -> Axis:
    """`KIND[:LORA]=V1,V2,…` (prompt values separated by |) → an Axis; resolve(name) → a LoRA file path."""
    head, sep, body = text.partition("=")
    if not sep:
        raise GridError(f"--grid {text!r}: write KIND=VALUES, e.g. weight:my-style=0,0.5,1 or seed=1,2,3")
    kind, _, lora = head.strip().partition(":")
    kind = kind.strip().lower()
    split = body.split("|") if kind in ("prompt", "sr") else body.split(",")
    values = [v.strip() for v in split if v.strip()]
    if kind == "lora":
        values = [None if v.lower() == "none" else _lora_value(v, resolve) for v in values]
    return make_axis(kind, values, str(resolve(lora.strip())) if lora.strip() else "", prompt)


def _lora_value(item: str, resolve) -> LoraSpec:
    path, sep, weight = item.rpartition(":")
    try:
        w = float(weight) if sep else 1.0
    except ValueError:  # float(): a path that holds ':' itself (C:\…) without a weight
        path, w = item, 1.0
    return LoraSpec(str(resolve(path if sep and path else item)), w)


def grid_pictures(base: Picture, x: Axis, y: Axis | None) -> list[Picture]:
    """Row-major: rows follow y (one row without it), columns follow x."""
    rows = y.values if y is not None else [None]
    return [x.apply(y.apply(base, yv) if y is not None else base, xv) for yv in rows for xv in x.values]


def grid_image(images: list[Image.Image], columns: list[str], rows: list[str] | None) -> Image.Image:
    """The pictures in a labelled grid: column labels above, row labels on the left, wrapped to fit."""
    w, h = images[0].size
    chars = max(6, w // 6)  # PIL's default font: about 6 px a character
    col_lines = [textwrap.wrap(c, chars)[:4] or [""] for c in columns]
    top = 4 + 11 * max(len(lines) for lines in col_lines)
    row_lines = [textwrap.wrap(r, 20)[:max(1, h // 11)] or [""] for r in rows] if rows else []
    left = 8 + 6 * max((len(line) for lines in row_lines for line in lines), default=0) if rows else 0
    n_rows = len(images) // len(columns)
    out = Image.new("RGB", (left + w * len(columns), top + h * n_rows), "white")
    draw = ImageDraw.Draw(out)
    for i, lines in enumerate(col_lines):
        draw.multiline_text((left + i * w + 3, 2), "\n".join(lines), fill="black", spacing=1)
    for j, lines in enumerate(row_lines):
        draw.multiline_text((3, top + j * h + 3), "\n".join(lines), fill="black", spacing=1)
    for k, image in enumerate(images):
        out.paste(image, (left + (k % len(columns)) * w, top + (k // len(columns)) * h))
    return out


def render_grid(gen, base: Picture, x: Axis, y: Axis | None = None, **kwargs) -> tuple[Image.Image, list[Image.Image]]:
    """The grid image and its pictures (row-major); kwargs: Generator.generate_batch's."""
    images = gen.generate_batch(grid_pictures(base, x, y), **kwargs)
    return grid_image(images, x.labels(), y.labels() if y is not None else None), images
