"""Captions: encodings, the trigger word, the seeded tricks, tag counts and the CLIP length check."""
from __future__ import annotations

import codecs
import random
from collections import Counter

import pytest

from trainer.data import CaptionTricks, apply_trigger, clip_overflow, read_caption
from trainer.data.captions import caption_lines, clip_tokenizer, count_tags, split_tags

TAGS = "sks, red hair, blue eyes, smile, outdoors, tree, sky, cloud"


@pytest.mark.parametrize("data,text,encoding", [
    ("plain ünïcode, ok".encode(), "plain ünïcode, ok", None),
    (codecs.BOM_UTF8 + "with bom".encode(), "with bom", None),
    ("café crème".encode("cp1252"), "café crème", "Windows-1252"),
    ("ünï".encode("utf-16"), "ünï", "UTF-16"),
    ("no bom, ünï".encode("utf-16-le"), "no bom, ünï", "UTF-16-LE"),
    (b"\x81\x8d odd", "\x81\x8d odd", "Latin-1"),  # bytes cp1252 leaves undefined
    (b"line one\r\nline two", "line one\nline two", None),
])
def test_read_caption_in_any_encoding(tmp_path, data, text, encoding):
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    got, note = read_caption(path)
    assert got == text
    if encoding is None:
        assert note is None
    else:
        assert "c.txt" in note and encoding in note and "UTF-8" in note


def test_first_line_or_every_line():
    assert caption_lines("\n  first  \nsecond\n\n", "first") == "first"
    assert caption_lines("a\n\nb\n", "random") == "a\nb"
    assert caption_lines(" \n", "first") == ""


def test_trigger_is_prepended_once():
    assert apply_trigger("red hair, smile", "sks") == "sks, red hair, smile"
    assert apply_trigger(apply_trigger("red hair", "sks"), "sks") == "sks, red hair"  # never twice
    assert apply_trigger("a photo of sks dog", "sks") == "a photo of sks dog"  # already there
    assert apply_trigger("sksx style", "sks") == "sks, sksx style"  # a longer word is not the trigger
    assert apply_trigger("", "sks") == "sks"
    assert apply_trigger("one\ntwo, sks", "sks") == "sks, one\ntwo, sks"
    assert apply_trigger("x", "") == "x"


def test_shuffle_keeps_trigger_and_keep_tokens_in_place():
    tricks = CaptionTricks(trigger="sks", shuffle=True, keep_tokens=1)
    seen = set()
    for seed in range(200):
        out = split_tags(tricks.apply(TAGS, random.Random(seed)))
        assert out[:2] == ["sks", "red hair"]  # the trigger, then keep_tokens=1 more
        assert sorted(out) == sorted(split_tags(TAGS))  # a permutation: nothing lost or added
        seen.add(tuple(out))
    assert len(seen) > 100
    assert not tricks.fixed and CaptionTricks(trigger="sks", keep_tokens=3).fixed


def test_tricks_are_a_function_of_the_seed():
    tricks = CaptionTricks(trigger="sks", shuffle=True, keep_tokens=0, caption_dropout=0.2, tag_dropout=0.3,
                           random_line=True)
    caption = TAGS + "\nsks, second line, more"
    first = [tricks.apply(caption, random.Random(s)) for s in range(100)]
    assert first == [tricks.apply(caption, random.Random(s)) for s in range(100)]
    assert first != [tricks.apply(caption, random.Random(s + 1000)) for s in range(100)]


def test_dropout_rates_and_what_is_never_dropped():
    n = 4000
    drop = CaptionTricks(caption_dropout=0.25)
    empties = sum(drop.apply(TAGS, random.Random(s)) == "" for s in range(n))
    assert abs(empties / n - 0.25) < 0.03
    tags = CaptionTricks(trigger="sks", keep_tokens=2, tag_dropout=0.4)
    kept = Counter()
    for s in range(n):
        out = split_tags(tags.apply(TAGS, random.Random(s)))
        assert out[:3] == ["sks", "red hair", "blue eyes"]  # pinned and kept tags are never dropped
        kept.update(out[3:])
    for tag in split_tags(TAGS)[3:]:
        assert abs(kept[tag] / n - 0.6) < 0.04
    assert kept.keys() <= set(split_tags(TAGS)[3:])


def test_count_tags_counts_captions_not_mentions():
    counts = count_tags(["a, b, a", "b, c", "c\nc, d"])
    assert counts == Counter({"a": 1, "b": 2, "c": 3, "d": 1})


def test_clip_length_uses_the_real_tokenizer():
    # Known CLIP BPE ids: a</w>=320, photo</w>=1125, of</w>=539, cat</w>=2368; "sks" is one rare token (the
    # reason DreamBooth picked it).
    assert clip_tokenizer()("a photo of a cat", add_special_tokens=False).input_ids == [320, 1125, 539, 320, 2368]
    assert clip_overflow("a photo of a cat") == (5, 0, "")
    assert clip_overflow("sks")[0] == 1
    tokens, lost, text = clip_overflow(", ".join(["red"] * 60))
    assert (tokens, lost) == (119, 44) and text.count("red") == 22
    assert clip_overflow("short\n" + ", ".join(["blue"] * 50))[:2] == (99, 24)  # the longest line counts


def test_trigger_ignores_case_like_clip():
    assert apply_trigger("SKS, smile", "sks") == "SKS, smile"
    out = CaptionTricks(trigger="sks", shuffle=True).apply("SKS, a, b, c, d", random.Random(1))
    assert out.startswith("SKS, ")
