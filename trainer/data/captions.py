"""Captions: reading a caption file in whatever encoding it came in, the trigger word, the per-step tricks
(tag shuffle with keep_tokens, caption dropout, tag dropout), tag counts, and the CLIP length check.

Tags are the comma-separated pieces of a caption. When a trigger word is set it leads every caption and is
pinned there: shuffling and tag dropout never move or drop it, and keep_tokens counts the tags after it.
"""
from __future__ import annotations

import codecs
import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

CLIP_TOKEN_LIMIT = 75  # 77 positions minus the start and end tokens
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "tokenizer"
CAPTION_LINE_MODES = ("first", "random")


class CaptionProblem(Exception):
    """A caption file that cannot be read at all; the image is then trained on its class text."""


def _decode(data: bytes) -> tuple[str, str | None]:
    """(text, name of the non-UTF-8 encoding used or None). A UTF-8 BOM is stripped silently."""
    if data.startswith(codecs.BOM_UTF8):
        try:
            return data[len(codecs.BOM_UTF8):].decode("utf-8"), None
        except UnicodeDecodeError:
            pass
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "UTF-16"
    if b"\x00" in data and len(data) % 2 == 0:  # UTF-16 without a BOM (some Windows tools write it)
        encoding = "utf-16-le" if data[1:2] == b"\x00" else "utf-16-be"
        try:
            return data.decode(encoding), encoding.upper()
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "Latin-1"  # decodes any byte string; the warning asks for a check


def read_caption(path: Path) -> tuple[str, str | None]:
    """The text of a caption file, and a warning when it was not UTF-8. CaptionProblem if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CaptionProblem(f"caption {Path(path).name} cannot be read ({e.strerror or e})") from None
    text, encoding = _decode(data)
    note = None
    if encoding:
        note = (f"caption {Path(path).name} is not UTF-8; read it as {encoding}: check the text and re-save the "
                f"file as UTF-8")
    return text.replace("\r\n", "\n").replace("\r", "\n"), note


def caption_lines(text: str, mode: str) -> str:
    """The caption kept from a file: its first non-empty line, or ("random") every non-empty line, one per
    line, of which each step picks one."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return ""
    return lines[0] if mode == "first" else "\n".join(lines)


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def has_trigger(caption: str, trigger: str) -> bool:
    """The trigger occurs as a whole word or phrase (so 'sks' is found in 'photo of sks dog', not in 'sksx').
    Case is ignored, as CLIP's tokenizer lower-cases everything: 'SKS' already is the trigger."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def apply_trigger(caption: str, trigger: str) -> str:
    """Prepend the trigger word once to each caption line; never twice, never when the caption has it already."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    lines = caption.split("\n") if caption else [""]
    return "\n".join(line if has_trigger(line, trigger) else (f"{trigger}, {line}" if line else trigger)
                     for line in lines)


@dataclass(frozen=True)
class CaptionTricks:
    """The per-step caption changes; apply() is a pure function of the caption and the rng it is given."""

    trigger: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    random_line: bool = False

    @property
    def fixed(self) -> bool:
        """No randomness: the same caption every step (so text-encoder outputs may be cached)."""
        return not (self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0 or self.random_line)

    def apply(self, caption: str, rng: random.Random) -> str:
        lines = caption.split("\n")
        line = rng.choice(lines) if self.random_line else lines[0]
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            return ""
        if not (self.shuffle or self.tag_dropout > 0):
            return line
        tags = split_tags(line)
        pinned = 1 if self.trigger and tags and tags[0].lower() == self.trigger.strip().lower() else 0
        keep = pinned + max(self.keep_tokens, 0)
        fixed, flex = tags[:keep], tags[keep:]
        if self.shuffle:
            rng.shuffle(flex)
        if self.tag_dropout > 0:
            flex = [tag for tag in flex if rng.random() >= self.tag_dropout]
        return ", ".join(fixed + flex)


def count_tags(captions: Iterable[str]) -> Counter:
    """How many captions carry each tag (every line of a multi-line caption counts)."""
    counts: Counter = Counter()
    for caption in captions:
        for line in caption.split("\n"):
            counts.update(dict.fromkeys(split_tags(line), 1))
    return counts


def coined_words(tag_counts: Counter, captions: int) -> list[str]:
    """Words in at least half of the captions that CLIP's vocabulary does not hold as one word ("zorbo" is
    'zor' + 'bo'; "red" and "background" are words it knows): what a set described in sentences, without a
    trigger word, calls its new subject, commonest first."""
    words: Counter = Counter()
    for tag, n in tag_counts.items():
        for word in dict.fromkeys(re.findall(r"[^\W\d_][\w'-]*", tag.lower())):
            words[word] += n
    vocab = clip_tokenizer().get_vocab()
    return [w for w, n in words.most_common() if 2 * min(n, captions) >= captions and f"{w}</w>" not in vocab]


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP BPE tokenizer shipped in trainer/tokenizer (loaded on first use; transformers is heavy)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def clip_overflow(caption: str) -> tuple[int, int, str]:
    """(tokens, tokens past the 75-token window, the text they spell) for the longest line of a caption."""
    tokenizer = clip_tokenizer()
    worst = (0, 0, "")
    for line in caption.split("\n"):
        ids = tokenizer(line, add_special_tokens=False, verbose=False).input_ids
        lost = max(len(ids) - CLIP_TOKEN_LIMIT, 0)
        if len(ids) > worst[0]:
            worst = (len(ids), lost, tokenizer.decode(ids[CLIP_TOKEN_LIMIT:]) if lost else "")
    return worst
