"""A run's evaluation: the prompts it is judged on, the base model's pictures, and the numbers at each checkpoint.

The measures themselves are defined in trainer/eval_metrics.py (strength, leak, likeness) and
trainer/validation.py (validation loss); the rule that picks a checkpoint from them in trainer/recommend.py.
Here: which prompts (derived from the captions unless the config names them), drawing them at fixed seeds, and
the `evaluation` event's fields.

Prompts:
- sample prompts: the config's, else the first caption and one held-out variation of it (its first colour word
  changed, so a user sees whether the LoRA follows the prompt or only repeats its training pictures);
- leak prompts: the config's, else the sample prompts with the trigger words taken out;
- likeness: up to evaluation.likeness_images training pictures, spread over the set, each redrawn with its own
  caption (eval_metrics.likeness).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import eval_metrics as em
from .data.captions import coined_words, count_tags

# Colour words and what a held-out variation puts in their place (a colour far from it on the wheel).
COLOUR_SWAP = {"red": "blue", "blue": "red", "green": "purple", "purple": "green", "yellow": "blue",
               "orange": "blue", "pink": "green", "white": "black", "black": "white", "brown": "blue",
               "gray": "red", "grey": "red", "blonde": "black", "silver": "red", "gold": "blue"}

Render = Callable[[list[str], list[int]], list[Image.Image]]  # (prompts, seeds) → pictures, one per prompt
# (seeds) → the likeness pictures redrawn (img2img at eval_metrics.REDRAW_STRENGTH) with their captions, in the
# order of Prompts.likeness; the caller holds the pictures (as latents) and their captions' embeddings.
Redraw = Callable[[list[int]], list[Image.Image]]


def trigger_words(captions: list[str], configured: str) -> list[str]:
    """The words that name the LoRA's subject or style: data.trigger_word when set; else the tags in at least
    half of the captions (how tagged sets name a trigger); else the coined words of captions written as
    sentences ("zorbo"): the Gallery's rule (trainer/lora_file.trigger_words), on the captions themselves."""
    if configured.strip():
        return [configured.strip()]
    counts = count_tags(captions)
    common = [t for t, n in counts.most_common() if 2 * n >= len(captions)][:5]
    return common or coined_words(counts, len(captions))[:3]


def without(prompt: str, words: list[str]) -> str:
    """The prompt with each of `words` taken out (as whole words), tidy commas and spaces."""
    for w in words:
        prompt = re.sub(rf"(?i)(^|[\s,]){re.escape(w)}(?=$|[\s,])", r"\1", prompt)
    prompt = re.sub(r"\s*,\s*(,\s*)+", ", ", prompt)
    return re.sub(r"\s{2,}", " ", prompt).strip(" ,")


def variation(caption: str, avoid: list[str] = ()) -> str | None:
    """The caption with its first colour word changed (to the far colour of COLOUR_SWAP, else the next colour
    that gives a caption not in `avoid`, the training captions); None when it names no colour."""
    match = re.search(rf"(?i)\b({'|'.join(COLOUR_SWAP)})\b", caption)
    if not match:
        return None
    word = match.group(1).lower()
    for colour in [COLOUR_SWAP[word]] + [c for c in COLOUR_SWAP if c != word]:
        changed = caption[:match.start()] + colour + caption[match.end():]
        if changed not in avoid:
            return changed
    return None


def default_sample_prompts(captions: list[str]) -> list[str]:
    """The first caption and its held-out variation."""
    other = variation(captions[0], captions)
    return [captions[0]] + ([other] if other else [])


@dataclass
class Prompts:
    sample: list[str]  # strength: the LoRA on these should differ from the base
    leak: list[str]  # these it should leave alone
    likeness: list[str]  # training captions, paired with likeness_images: what each is redrawn with
    likeness_images: list[Image.Image] = field(default_factory=list)


def evaluation_prompts(sample: list[str], leak: list[str], captions: list[str],
                       picture: Callable[[int], Image.Image], triggers: list[str],
                       count: int) -> Prompts:
    """The three prompt sets; `picture(i)` is the training picture of `captions[i]` (only the likeness pairs'
    are loaded); count: evaluation.likeness_images.

    The likeness pictures are spread over the captions that hold a trigger word (all captions when none does):
    those show what the LoRA is to learn. Pictures captioned without it (the demo style sets' plain figures, a
    set's pictures of the class alone) show what it should leave as it was; the base already redraws them well,
    so in the likeness they would weigh what the LoRA changes there, which is the leak's question, not its own."""
    leak = leak or [p for p in dict.fromkeys(without(p, triggers) for p in sample) if p and p not in sample]
    teaching = [i for i, c in enumerate(captions) if without(c, triggers) != c] or list(range(len(captions)))
    picks = [teaching[k] for k in sorted({round(i * len(teaching) / count) for i in range(min(count, len(teaching)))})]
    return Prompts(sample, leak, [captions[i] for i in picks], [picture(i) for i in picks])


class Evaluator:
    """Holds the base model's pictures' features; measures a checkpoint's pictures against them."""

    def __init__(self, encoder, prompts: Prompts, seed: int):
        self.encoder, self.prompts, self.seed = encoder, prompts, seed  # encoder: the VAE's (features)
        self.training = em.each_features(encoder, prompts.likeness_images) if prompts.likeness_images else None
        self.base: dict[str, list] | None = None
        self.base_pictures: list[Image.Image] = []
        self.last_pictures: list[Image.Image] = []

    def all_prompts(self) -> tuple[list[str], list[int]]:
        """Every prompt drawn from noise at a checkpoint, each once, with its seed (seed + its place in the list)."""
        prompts = list(dict.fromkeys(self.prompts.sample + self.prompts.leak))
        return prompts, [self.seed + i for i in range(len(prompts))]

    def redraw_seeds(self) -> list[int]:
        """The noise of each likeness picture's redraw: the same at every checkpoint, and for the base."""
        return [self.seed + 1000 + i for i in range(len(self.prompts.likeness))]

    def _draw(self, render: Render, redraw: Redraw) -> tuple[dict[str, Image.Image], dict[str, list]]:
        prompts, seeds = self.all_prompts()
        pictures = dict(zip(prompts, render(prompts, seeds))) if prompts else {}
        feats = {name: em.vae_features(self.encoder, [pictures[p] for p in group])
                 for name, group in (("sample", self.prompts.sample), ("leak", self.prompts.leak)) if group}
        if self.training:
            feats["likeness"] = em.each_features(self.encoder, redraw(self.redraw_seeds()))
        return pictures, feats

    def set_base(self, render: Render, redraw: Redraw) -> list[Image.Image]:
        """The base model's pictures (a LoRA at step 0 is the identity): what strength, leak and likeness are
        measured from."""
        pictures, self.base = self._draw(render, redraw)
        self.base_pictures = list(pictures.values())
        return self.base_pictures

    def measure(self, render: Render, redraw: Redraw) -> dict:
        """strength, leak, likeness of the model `render` and `redraw` draw with (see eval_metrics)."""
        assert self.base is not None, "set_base first"
        pictures, feats = self._draw(render, redraw)
        self.last_pictures = [pictures[p] for p in self.prompts.sample]  # the sample prompts', for the UI
        out: dict = {}
        for name in ("sample", "leak"):
            if name in feats:
                value = float(em.picture_distance(feats[name], self.base[name]).mean())
                out["strength" if name == "sample" else "leak"] = round(value, 5)
        out.setdefault("leak", None)
        if "likeness" in feats:
            value = em.likeness(feats["likeness"], self.base["likeness"], self.training)
            out["likeness"] = None if value is None else round(value, 4)
        return out
