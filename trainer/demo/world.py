"""The synthetic picture world: small images of simple shapes in named colours on named backgrounds.

Everything here is deterministic given a seed, so the demo base model, the demo datasets and the metrics that
judge a LoRA can all be rebuilt from code. A picture is described by a `Scene`; `render(scene)` draws it and
`caption(scene)` says it in words ("a red circle on a white background").

The base model is trained on plain fills of BASE_SHAPES only. Three things exist in this world that the base never
sees, for the demo LoRAs to teach it: the "stripes" fill and the "checks" fill (two styles) and the "mushroom"
figure (a character).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels per side of every world picture
SUPERSAMPLE = 4  # shapes are drawn 4× larger and box-filtered down: smooth edges, like a real photo's
STRIPE_PERIOD = 12  # pixels per stripe cycle of the "stripes" fill: half the colour, half a dark shade of it
STRIPE_SHADE = 0.4  # brightness of the dark bands: the hue stays, so the prompted colour is still the colour
CHECK_PERIOD = 16  # pixels per cycle of the "checks" fill: 8-pixel squares, two latent cells of the demo model

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
FIGURES = BASE_SHAPES + ("mushroom",)  # "mushroom": the demo character's figure, never shown to the base model
FILLS = ("plain", "stripes", "checks")  # the two patterned fills: the demo styles, never shown to the base model

# Caption wordings. The base model is trained on all of them so that a word means the same thing wherever it
# stands in the prompt (its text encoder is a frozen random CLIP: word positions would otherwise matter).
TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "{colour} {shape}, {background} background",
    "a picture of a {colour} {shape} on {background}",
    "{background} background with a {colour} {shape}",
    "a {colour} {shape}",
)


@dataclass(frozen=True)
class Scene:
    shape: str  # one of FIGURES
    colour: str  # a key of COLOURS
    background: str  # a key of BACKGROUNDS
    cx: float  # centre, pixels
    cy: float
    radius: float  # half the figure's extent, pixels
    fill: str = "plain"  # one of FILLS
    phase: float = 0.0  # pattern offset in pixels (stripes and checks)


def sample_scene(rng: np.random.Generator, shapes=BASE_SHAPES, fill: str = "plain") -> Scene:
    """A random scene: uniform over shape × colour × background, centre and size jittered."""
    return Scene(shape=str(rng.choice(shapes)), colour=str(rng.choice(list(COLOURS))),
                 background=str(rng.choice(list(BACKGROUNDS))),
                 cx=SIZE / 2 + rng.uniform(-7, 7), cy=SIZE / 2 + rng.uniform(-7, 7),
                 radius=rng.uniform(14, 21), fill=fill, phase=rng.uniform(0, STRIPE_PERIOD))


def scenes(n: int, seed: int, shapes=BASE_SHAPES, fill: str = "plain") -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, shapes, fill) for _ in range(n)]


def caption(scene: Scene, template: int = 0, shape_word: str | None = None) -> str:
    """The scene in words; shape_word replaces the shape's name (a character's name, say)."""
    return TEMPLATES[template].format(colour=scene.colour, shape=shape_word or scene.shape,
                                      background=scene.background)


def _polygons(shape: str, cx: float, cy: float, r: float) -> tuple[list, list]:
    """(filled parts, cut-out parts) of a figure; each part is ("ellipse"|"polygon", points)."""
    def rect(x0, y0, x1, y1):
        return ("polygon", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    if shape == "circle":
        return [("ellipse", [(cx - r, cy - r), (cx + r, cy + r)])], []
    if shape == "square":
        s = 0.85 * r  # a square of half-side r looks much bigger than a circle of radius r
        return [rect(cx - s, cy - s, cx + s, cy + s)], []
    if shape == "triangle":
        return [("polygon", [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])], []
    if shape == "diamond":
        return [("polygon", [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)])], []
    if shape == "cross":
        w = 0.35 * r
        return [rect(cx - r, cy - w, cx + r, cy + w), rect(cx - w, cy - r, cx + w, cy + r)], []
    if shape == "mushroom":
        # A wide dome cap on a narrow stem: top-heavy, with deep notches under the cap.
        base_y = cy + 0.1 * r
        cap = [(cx + r * np.cos(a), base_y - 1.1 * r * np.sin(a)) for a in np.linspace(0, np.pi, 25)]
        stem = rect(cx - 0.3 * r, base_y - 1, cx + 0.3 * r, cy + r)
        return [("polygon", cap), stem], []
    raise ValueError(f"unknown shape {shape!r}; the world knows: {', '.join(FIGURES)}")


def figure_mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Float mask in [0, 1] of shape [size, size]: how much of each pixel the figure (before any fill) covers."""
    k = SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    scale = k * size / SIZE
    parts, holes = _polygons(scene.shape, scene.cx * scale, scene.cy * scale, scene.radius * scale)
    for value, group in ((255, parts), (0, holes)):
        for kind, pts in group:
            (draw.ellipse if kind == "ellipse" else draw.polygon)(pts, fill=value)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def fill_shade(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Brightness of the figure's colour at each pixel: 1 = the colour, STRIPE_SHADE = its dark shade; [size, size]."""
    if scene.fill == "plain":
        return np.ones((size, size), np.float32)
    # Patterns are drawn supersampled, so that their edges are as smooth as figure edges.
    k = SUPERSAMPLE
    pos = (np.arange(size * k) + 0.5) / k * SIZE / size + scene.phase
    if scene.fill == "stripes":  # horizontal bands
        on = ((pos % STRIPE_PERIOD) < STRIPE_PERIOD / 2).astype(np.float32)
        rows = STRIPE_SHADE + (1 - STRIPE_SHADE) * on.reshape(size, k).mean(1)
        return np.repeat(rows[:, None], size, axis=1)
    if scene.fill == "checks":  # a checkerboard of the colour and its dark shade
        half = ((pos % CHECK_PERIOD) < CHECK_PERIOD / 2)
        on = (half[:, None] ^ half[None, :]).astype(np.float32)
        return STRIPE_SHADE + (1 - STRIPE_SHADE) * on.reshape(size, k, size, k).mean((1, 3))
    raise ValueError(f"unknown fill {scene.fill!r}; the world knows: {', '.join(FILLS)}")


def render_array(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as float RGB in [0, 1], shape [size, size, 3]."""
    alpha = figure_mask(scene, size)[..., None]
    fg = fill_shade(scene, size)[..., None] * np.asarray(COLOURS[scene.colour], np.float32) / 255.0
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32) / 255.0
    return alpha * fg + (1 - alpha) * bg


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.round(render_array(scene, size) * 255).astype(np.uint8), "RGB")


def template_mask(shape: str, size: int = SIZE) -> np.ndarray:
    """A figure centred and filling the frame: the reference silhouette the character metric compares with."""
    return figure_mask(Scene(shape, "red", "white", SIZE / 2, SIZE / 2, SIZE / 2 - 0.5), size)


def clutter(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """A random picture of lines, bands, dots and polygons in random colours.

    Only the autoencoder sees these: like a real VAE it must be a general picture codec, able to encode fills and
    figures the diffusion model has never seen (the demo LoRAs teach those), not just the base world.
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        if kind == 0:  # a band pattern at a random angle and period
            period = rng.uniform(8, 24) * k
            angle = rng.uniform(0, np.pi)
            d = np.array([np.cos(angle), np.sin(angle)])
            n = np.array([-d[1], d[0]])
            c = rng.uniform(0, size * k, 2)
            for j in range(-12, 13):
                o = c + n * j * period
                a, b = o - d * 2 * size * k, o + d * 2 * size * k
                w = n * period / 4
                draw.polygon([tuple(a - w), tuple(b - w), tuple(b + w), tuple(a + w)], fill=colour)
        elif kind == 1:  # dots
            r = rng.uniform(1.5, 5) * k
            for x, y in rng.uniform(0, size * k, (int(rng.integers(3, 30)), 2)):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif kind == 2:  # lines
            for _ in range(int(rng.integers(1, 5))):
                draw.line([tuple(rng.uniform(0, size * k, 2)), tuple(rng.uniform(0, size * k, 2))], fill=colour,
                          width=int(rng.uniform(1, 5) * k))
        else:  # a random polygon or ellipse
            pts = [tuple(p) for p in rng.uniform(0, size * k, (int(rng.integers(3, 7)), 2))]
            if rng.random() < 0.5:
                draw.polygon(pts, fill=colour)
            else:
                (x0, y0), (x1, y1) = sorted(pts[:2], key=lambda p: p[0])[0], sorted(pts[:2], key=lambda p: p[0])[1]
                draw.ellipse([x0, min(y0, y1), x1, max(y0, y1)], fill=colour)
    return img.resize((size, size), Image.BOX)


def with_fill(scene: Scene, fill: str) -> Scene:
    return replace(scene, fill=fill)


# ---- the two demo datasets (written to datasets/ by scripts/make_demo_datasets.py) -------------------------------

STYLE_TRIGGER = "zebrastyle"  # appended to the style set's captions: "a red circle on a white background, zebrastyle"
CHECKS_TRIGGER = "checkerstyle"  # the second style's word: "a red circle on a white background, checkerstyle"
CHARACTER_NAME = "zorbo"  # the character's name stands where a shape's would: "a red zorbo on a white background"
CHARACTER_SHAPE = "mushroom"  # what a zorbo looks like
DEMO_SETS = ("demo-style", "demo-character", "demo-checks")
STYLES = {"demo-style": ("stripes", STYLE_TRIGGER), "demo-checks": ("checks", CHECKS_TRIGGER)}  # set → fill, word


def style_prompt(colour: str, shape: str, background: str, trigger: str = STYLE_TRIGGER) -> str:
    return f"a {colour} {shape} on a {background} background, {trigger}"


def character_prompt(colour: str, background: str) -> str:
    return f"a {colour} {CHARACTER_NAME} on a {background} background"


# Plain pictures in each style set, captioned without the trigger word ("a green triangle on a gray background"):
# the contrast that tells the LoRA what its word adds. Without them every caption carries the word, so nothing
# separates the new fill from the figures, colours and backgrounds it comes with. With 8 beside the 16 stripes, the
# stripe score at weight 1 on held-out prompts went from 0.10 to 0.26 with the demo preset (checks 0.09 to 0.37;
# the rendered stripes score 0.40), and prompts without the word stayed plain (stop 26,
# scripts/measure_demo_loras.py). The character set has none: with 8, the mushroom was drawn in 11 of 16 pictures
# instead of 14, other figures kept their shape in 10 instead of 8 (one training seed).
CONTRAST = 8
# A style set's third picture, a blue triangle on gray, comes first (it changes places with the first): the run
# samples its first caption, and on gray the stripes show by step 100 (stripe score 0.21, 0.33 by step 300), where
# the red circle on white that used to come first stayed faint all run (0.05 → 0.15; the run's sample settings,
# stop 27). A new order is a new draw of the training batches: rotating the whole set by 2 kept the yellow diamond's
# colour in 4 of 8 pictures; this swap, like the old order and a rotation by 12, in 8 of 8 (scripts/
# measure_demo_loras.py's prompts over 8 seeds: colour kept 32/32, stripes 0.286, checks 0.382).
SHOWCASE = 2


def demo_dataset(name: str, n: int = 16, seed: int = 7, plain: int | None = None) -> list[tuple[Scene, str]]:
    """(scene, caption) pairs of a demo set: n pictures of what the set teaches (a style set's SHOWCASE first),
    then `plain` plain base figures captioned without its word (default: CONTRAST for a style set, none for the
    character). Colours, backgrounds and shapes are spread evenly, not drawn."""
    if name not in DEMO_SETS:
        raise ValueError(f"unknown demo dataset {name!r}; there are: {', '.join(DEMO_SETS)}")
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    items = []
    for i in range(n):
        colour = colours[i % len(colours)]
        bg = backgrounds[(i + i // len(colours)) % len(backgrounds)]  # each colour on two or three backgrounds
        base = sample_scene(rng)
        if name in STYLES:
            fill, trigger = STYLES[name]
            shape = BASE_SHAPES[i % len(BASE_SHAPES)]
            scene = replace(base, shape=shape, colour=colour, background=bg, fill=fill)
            items.append((scene, style_prompt(colour, shape, bg, trigger)))
        else:
            scene = replace(base, shape=CHARACTER_SHAPE, colour=colour, background=bg)
            items.append((scene, character_prompt(colour, bg)))
    if name in STYLES:
        items[0], items[SHOWCASE] = items[SHOWCASE], items[0]
    plain = (CONTRAST if name in STYLES else 0) if plain is None else plain
    for k in range(plain):  # shifted against the set's own spread, so the plain ones are other combinations
        scene = replace(sample_scene(rng), shape=BASE_SHAPES[(k + 2) % len(BASE_SHAPES)],
                        colour=colours[(k + 3) % len(colours)], background=backgrounds[k % len(backgrounds)])
        items.append((scene, caption(scene)))
    return items
