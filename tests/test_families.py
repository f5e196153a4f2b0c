"""The family table's names agree with themselves: what our exports write is what the LoRA detection reads."""
from __future__ import annotations

import pytest

from trainer.families import FAMILIES, detect_lora_family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_lora_is_read_as_the_layout_of_the_family_it_was_trained_on(name):
    family = FAMILIES[name]
    # Our exports write both keys (trainer/metadata.py); other trainers often write only one of them.
    assert detect_lora_family([], {"ss_base_model_version": family.base_model_version}) == family.arch
    assert detect_lora_family([], {"modelspec.architecture": family.architecture}) == family.arch
    assert family.arch in ("sd1", "sd2", "sdxl")  # sd2 and sd2-v LoRAs share one layout


def test_kohyas_v2_flag_on_a_v1_version_means_sd2():
    assert detect_lora_family([], {"ss_base_model_version": "sd_v1", "ss_v2": "True"}) == "sd2"
    assert detect_lora_family([], {}) == "unknown"
