"""Image metrics that say whether a demo LoRA taught what its dataset shows, from the pixels alone.

They judge generated pictures of the shape world (trainer/demo/world.py), where nothing is known but the prompt:
- stripe_score: the demo style. How much brightness changes from row to row inside the figure: 0 for a flat
  fill, about 0.4 for the world's stripes.
- check_score: the second demo style (a checkerboard). The brightness inside the figure that its rows (or its
  columns) do not explain: about 0 for a flat fill and for stripes, 0.2-0.4 for the world's checks.
- character_score: the demo character. Overlap (IoU) of the figure's silhouette with the character's template,
  both scaled to their bounding box: about 0.9–1 for the mushroom at any place and size, 0.4–0.72 for the base
  shapes. best_fit names the template a silhouette overlaps most, for a yes/no per picture.
- colour_score: the content. Of the coloured pixels, the share whose hue is nearest the prompted colour's.
- background_right: the prompted background. Whether the picture's frame is the prompted background colour.
- silhouette_iou / shape_iou: whether a styled figure is the figure drawn without the style, where it stands /
  as a shape (place and size aside).
- edge_width: crispness. Pixels of blend between figure and background per pixel of outline: about 1 for the
  world's own (anti-aliased) rendering, 2-3 for a soft blob.

All take a PIL image (or an [H, W, 3] float array in [0, 1]) and return a float in [0, 1].
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageFilter

from trainer.demo import world

# A pixel's RGB distance (0..√3) from the background: below FG_NOISE it is background (noise, faint haze), from
# FG_FULL on it is fully figure. The darkest figure colour (a dark stripe on black) is about 0.29 away.
FG_NOISE, FG_FULL = 0.1, 0.25
MIN_ROW_PIXELS = 3  # rows with fewer core pixels than this say little about the fill
CHROMATIC = 0.3  # saturation above which a pixel has a hue worth counting (the backgrounds are grey)
COMPARE = 32  # silhouettes are compared on a COMPARE × COMPARE grid


def as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    return np.asarray(image, np.float32)


def background(arr: np.ndarray) -> np.ndarray:
    """The background colour: the median of a 2-pixel frame (figures of the world stay inside it)."""
    frame = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                            arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def foreground(arr: np.ndarray) -> np.ndarray:
    """Soft figure mask [H, W] in [0, 1]: how far each pixel is from the background colour."""
    dist = np.linalg.norm(arr - background(arr), axis=-1)
    return np.clip((dist - FG_NOISE) / (FG_FULL - FG_NOISE), 0.0, 1.0)


def core(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    """The figure without its outer `margin` pixels: the rim is a blend of figure and background."""
    img = Image.fromarray(((mask > 0.5) * 255).astype(np.uint8), "L")
    return np.asarray(img.filter(ImageFilter.MinFilter(2 * margin + 1))) > 0


def stripe_score(image) -> float:
    """Relative spread of the mean brightness of the figure's rows.

    A flat fill has the same brightness in every row whatever the figure's width; horizontal stripes make rows
    alternate between the colour and its dark shade. Brightness is HSV value (max of R, G, B), so the score does
    not depend on the hue; only the figure's core counts, so blurred edges do not look like bands.
    """
    arr = as_array(image)
    inside = core(foreground(arr))
    count = inside.sum(1)
    rows = count >= MIN_ROW_PIXELS
    if rows.sum() < 2:
        return 0.0
    row_value = (inside * arr.max(-1)).sum(1)[rows] / count[rows]
    return float(min(1.0, row_value.std() / max(row_value.mean(), 1e-6)))


def check_score(image) -> float:
    """Relative spread of the figure's brightness left over after its row means, or its column means, are taken out
    (whichever leaves less).

    A checkerboard's rows and columns all average the same, so taking out either leaves all of its pattern;
    stripes vary by row only (or by column), and a flat fill not at all, so one of the two leaves them near 0.
    Only the figure's core counts, as in stripe_score.
    """
    arr = as_array(image)
    inside = core(foreground(arr))
    if inside.sum() < 4 * MIN_ROW_PIXELS:
        return 0.0
    value = arr.max(-1)
    mean = value[inside].mean()
    left = []
    for axis in (1, 0):
        means = (inside * value).sum(axis, keepdims=True) / np.maximum(inside.sum(axis, keepdims=True), 1)
        left.append((value - means)[inside].std())
    return float(min(1.0, min(left) / max(mean, 1e-6)))


def silhouette(mask: np.ndarray) -> np.ndarray | None:
    """A mask cropped to its bounding box and resized to COMPARE × COMPARE; None if there is no figure.

    An opening (erode, then dilate, 3×3) first drops specks and 1-pixel lines, such as the stray corner pixels
    a small decoder leaves, which would otherwise stretch the bounding box to the whole picture.
    """
    hard = Image.fromarray(((mask > 0.5) * 255).astype(np.uint8), "L")
    opened = np.asarray(hard.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3)), np.float32) / 255
    ys, xs = np.nonzero(opened > 0.5)
    if len(ys) < 4:
        return None
    crop = opened[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray((crop * 255).astype(np.uint8), "L").resize((COMPARE, COMPARE), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def character_score(image, shape: str = world.CHARACTER_SHAPE) -> float:
    """Soft IoU of the picture's figure with the template of `shape` (position and size do not matter)."""
    return _fits(image, (shape,))[shape]


def best_fit(image, shapes=world.FIGURES) -> str:
    """The shape of `shapes` whose template the picture's figure overlaps most (ties: the first)."""
    fits = _fits(image, shapes)
    return max(fits, key=fits.get)


def _fits(image, shapes) -> dict[str, float]:
    got = silhouette(foreground(as_array(image)))
    out = {}
    for shape in shapes:
        ref = _template(shape)
        out[shape] = 0.0 if got is None else float(np.minimum(got, ref).sum() / max(np.maximum(got, ref).sum(), 1e-6))
    return out


_TEMPLATES: dict[str, np.ndarray] = {}


def _template(shape: str) -> np.ndarray:
    if shape not in _TEMPLATES:  # drawn supersampled: worth keeping
        _TEMPLATES[shape] = silhouette(world.template_mask(shape))
    return _TEMPLATES[shape]


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*rgb)[0]


def colour_score(image, colour: str) -> float:
    """Share of the chromatic pixels whose hue is nearer to `colour` than to any other colour of the world."""
    if colour not in world.COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the world's colours are: {', '.join(world.COLOURS)}")
    arr = as_array(image)
    mx, mn = arr.max(-1), arr.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    chromatic = (sat > CHROMATIC) & (mx > 0.15)
    if chromatic.sum() < 0.01 * chromatic.size:
        return 0.0
    r, g, b = (arr[..., i][chromatic] for i in range(3))
    delta = np.maximum(mx[chromatic] - mn[chromatic], 1e-6)
    # HSV hue in [0, 1), vectorised as in colorsys.rgb_to_hsv.
    hue = np.where(mx[chromatic] == r, ((g - b) / delta) % 6,
                   np.where(mx[chromatic] == g, (b - r) / delta + 2, (r - g) / delta + 4)) / 6.0
    names = list(world.COLOURS)
    palette = np.array([_hue(np.array(world.COLOURS[n]) / 255.0) for n in names])
    gap = np.abs(hue[:, None] - palette[None, :])
    gap = np.minimum(gap, 1 - gap)  # hue is an angle
    nearest = gap.argmin(1)
    return float((nearest == names.index(colour)).mean())


BACKGROUND_TOLERANCE = 40  # of 255 per channel: a tint a viewer would call another colour (gray is 128, white 255)


def background_right(image, name: str) -> bool:
    """Whether the picture's background (its frame's median) is the world background `name` within
    BACKGROUND_TOLERANCE in every channel: a washed-out or tinted background (white for gray, cyan-white for
    white) is a picture the prompt did not ask for."""
    got = background(as_array(image)) * 255
    return bool(np.abs(got - np.asarray(world.BACKGROUNDS[name], np.float32)).max() < BACKGROUND_TOLERANCE)


def edge_width(image) -> float:
    """Mean width, in pixels, of the band where the picture blends from background to figure.

    Each pixel's blend is its distance from the background colour over the figure colour's (the median of the
    figure's core): 0 = background, 1 = figure. Pixels between 0.15 and 0.85 are the blend band; its area over the
    outline's length (the hard figure's pixels that touch the background) is its width. A world rendering
    (supersampled, box-filtered) measures about 1; every pixel a blur adds to the edge adds about 1. NaN when the
    picture has no figure to measure.
    """
    arr = as_array(image)
    bg = background(arr)
    hard = foreground(arr) > 0.5
    inside = core(foreground(arr))
    if inside.sum() < 9:
        return float("nan")
    fg = np.median(arr[inside], axis=0)
    span = np.linalg.norm(fg - bg)
    if span < FG_FULL:
        return float("nan")
    blend = np.clip(((arr - bg) @ (fg - bg)) / span ** 2, 0.0, 1.0)
    band = ((blend > 0.15) & (blend < 0.85)).sum()
    padded = np.pad(hard, 1)
    touches = ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    outline = (hard & touches).sum()
    return float(band / max(outline, 1))


def silhouette_iou(image, reference) -> float:
    """IoU of two pictures' figures where they stand (not moved or scaled): is a styled figure still the figure
    the same seed drew without the style? Patterns do not count: a dark band is figure, not background."""
    a, b = (foreground(as_array(im)) > 0.5 for im in (image, reference))
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


# Gaps up to this wide (px) between a figure's parts are closed before outlines are compared: the world's dark
# bands are half a stripe period wide, and on a black background a band can melt into it.
BAND_GAP = world.STRIPE_PERIOD // 2 + 1


def shape_iou(image, reference) -> float:
    """IoU of two pictures' figure outlines, each scaled to its bounding box: is a styled figure still the shape
    the same seed drew without the style, wherever and however large it is drawn? Gaps of up to BAND_GAP pixels
    are closed first (a closing: dilate, then erode), so a pattern's dark bands that melt into a dark background
    do not cut the outline into bars. 0 when either picture has no figure."""
    a, b = (silhouette(_closed(foreground(as_array(im)) > 0.5)) for im in (image, reference))
    if a is None or b is None:
        return 0.0
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _closed(mask: np.ndarray) -> np.ndarray:
    img = Image.fromarray((mask * 255).astype(np.uint8), "L")
    closed = img.filter(ImageFilter.MaxFilter(BAND_GAP)).filter(ImageFilter.MinFilter(BAND_GAP))
    return np.asarray(closed, np.float32) / 255.0


def commonest_colour(image) -> str:
    """The world colour most of the picture's chromatic pixels are nearest to."""
    scores = {c: colour_score(image, c) for c in world.COLOURS}
    return max(scores, key=scores.get)


def mean_scores(images, colours: list[str], shape: str = world.CHARACTER_SHAPE) -> dict[str, float]:
    """The scores averaged over pictures; colours[i] is the colour picture i was prompted with.

    "drawn" is the share of pictures whose figure fits `shape` best of all the world's figures.
    """
    return {"stripes": float(np.mean([stripe_score(im) for im in images])),
            "checks": float(np.mean([check_score(im) for im in images])),
            "character": float(np.mean([character_score(im, shape) for im in images])),
            "drawn": float(np.mean([best_fit(im) == shape for im in images])),
            "colour": float(np.mean([colour_score(im, c) for im, c in zip(images, colours)]))}
