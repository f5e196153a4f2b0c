"""The Gallery in the page, on the session's trained LoRA and a second one brought from elsewhere: listed with
its trigger word, stacked, generated with a step bar, a live preview and Cancel, <lora:…> in the prompt counted,
and a refusal naming <lora:…> shown as text, not swallowed as HTML. Checked against the files written too."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from page_tools import DEMO_MODEL, field, open_page, wait_file
from trained_run import RUN

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def second_lora(studio):
    """Another LoRA for the demo model, as if brought from elsewhere: random up weights, kohya format."""
    from trainer.config import NetworkConfig
    from trainer.lora_file import save_lora, text_encoder_prefixes, to_kohya
    from trainer.models import load_base_model
    from trainer.network import add_lora, lora_state

    base = load_base_model(DEMO_MODEL)
    add_lora(base.unet, base.text_encoders, NetworkConfig(rank=4, alpha=4.0))
    gen = torch.Generator().manual_seed(0)
    for model in [base.unet, *base.text_encoders]:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
    parts = {"lora_unet_": lora_state(base.unet),
             **{pre: lora_state(te) for pre, te in zip(text_encoder_prefixes(len(base.text_encoders)),
                                                       base.text_encoders)}}
    return save_lora(studio.models_dir / "Lora" / "second-style.safetensors", to_kohya(parts, 4.0),
                     {"ss_base_model_version": base.family.base_model_version, "ss_output_name": "second-style",
                      "modelspec.trigger_phrase": "second style"})


@pytest.fixture
def gallery(trained, second_lora, studio, browser, shots):
    page = open_page(browser, studio.url, shots)
    page.get_by_role("tab", name="Gallery").click()
    cell = page.locator("#lora-table").get_by_text(RUN, exact=True).filter(visible=True).first
    cell.wait_for(timeout=30_000)
    return page


def generated(studio) -> list:
    return sorted((studio.outputs_dir / "generated").glob("*gen*.png"), key=lambda p: p.stat().st_mtime)


def wait_phase(page, phase: str, timeout_s: float = 300) -> None:
    page.wait_for_selector(f'#gen-progress-text[data-phase="{phase}"]', timeout=timeout_s * 1000)


def test_the_trained_lora_is_listed_with_its_trigger_word(gallery, shots):
    page = gallery
    page.locator("#lora-table").get_by_text(RUN, exact=True).filter(visible=True).first.click()
    details = page.locator("#lora-details", has_text=RUN)
    details.wait_for(timeout=30_000)
    assert "zebrastyle" in details.inner_text()  # the demo style's captions all end in it
    shots.take(page, "gallery")


def test_stack_two_loras_and_generate_with_progress(gallery, studio, shots):
    page = gallery
    table = page.locator("#lora-table")
    for slot, name in enumerate((RUN, "second-style")):
        table.get_by_text(name, exact=True).filter(visible=True).first.click()
        page.locator("#lora-details", has_text=name).wait_for(timeout=30_000)
        page.locator("#add-to-mix").click()
        page.wait_for_function(f"document.querySelector('#slot-{slot}-lora input').value === {name!r}",
                               timeout=30_000)
    field(page, "gen-prompt").fill("a red circle")
    field(page, "gen-steps").fill("6")
    before = len(generated(studio))
    page.locator("#generate").click()
    wait_phase(page, "done")
    page.locator("#gen-info textarea, #gen-info input").first.wait_for()
    info = field(page, "gen-info").input_value()
    assert "2 LoRA(s): 2 from the pickers, 0 from the prompt" in info, info
    assert page.locator("#gen-progress-text").get_attribute("data-step") == "6"
    assert len(generated(studio)) == before + 1
    newest = generated(studio)[-1]
    page.wait_for_function(f"[...document.querySelectorAll('#gen-image img')].some(img => "
                           f"decodeURIComponent(img.src).includes({newest.name!r}))", timeout=30_000)
    shots.take(page, "generated")
    # the second LoRA at half weight: a new picture at the same seed, different pixels
    slider = field(page, "slot-1-unet")
    slider.fill("0.5")
    slider.press("Enter")
    page.locator("#generate").click()
    wait_file(studio.outputs_dir / "generated", lambda _: len(generated(studio)) == before + 2, 300)
    wait_phase(page, "done")
    first, second = generated(studio)[-2:]
    assert second != first
    pixels = [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in (first, second)]
    assert np.abs(pixels[0] - pixels[1]).max() > 8, "the new weight was used"
    assert "Base model loads so far: 1" in field(page, "gen-info").input_value()


def test_a_long_generation_shows_a_preview_and_can_be_cancelled(gallery, studio, shots):
    page = gallery
    field(page, "gen-prompt").fill("a blue square on a yellow background")
    field(page, "gen-steps").fill("150")
    before = len(generated(studio))
    page.locator("#generate").click()
    page.wait_for_function("Number(document.querySelector('#gen-progress-text')?.dataset.step) >= 3",
                           timeout=120_000)
    text = page.locator("#gen-progress-text").inner_text()
    assert "step" in text and "/ 150" in text
    page.locator("#gen-image img").first.wait_for(timeout=30_000)  # the live preview
    shots.take(page, "previewing")
    page.locator("#cancel-generate").click()
    wait_phase(page, "cancelled", 60)
    assert int(page.locator("#gen-progress-text").get_attribute("data-step")) < 150
    page.wait_for_function("document.querySelector('#gen-info textarea, #gen-info input').value"
                           ".startsWith('Cancelled at step')", timeout=30_000)
    assert len(generated(studio)) == before, "a cancelled picture is not saved"
    shots.take(page, "cancelled")


def test_prompt_loras_are_counted_and_a_refusal_naming_one_is_shown_as_text(gallery, studio, shots):
    page = gallery
    assert all(field(page, f"slot-{slot}-lora").input_value() in ("", "(none)") for slot in range(4))
    field(page, "gen-prompt").fill(f"a red circle <lora:{RUN}:1>")
    field(page, "gen-steps").fill("4")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#gen-info textarea, #gen-info input').value.includes('LoRA(s)')",
                           timeout=300_000)
    info = field(page, "gen-info").input_value()
    assert "1 LoRA(s): 0 from the pickers, 1 from the prompt" in info, info  # it said "0 LoRA(s)"
    field(page, "gen-prompt").fill("a red circle <lora:no-such-lora:1>")
    page.locator("#generate").click()
    toast = page.locator(".toast-body", has_text="no-such-lora")
    toast.first.wait_for(timeout=60_000)
    text = toast.first.inner_text()
    assert "<lora:no-such-lora:…> names no file" in text, text  # was cut at "<": rendered as HTML
    shots.take(page, "refusal-as-text")
