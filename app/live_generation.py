"""Generation the user can watch and stop: a step bar with time left, a preview of the latents every few steps,
and Cancel. The same for sweeps (their steps counted across all pictures) and for the first base-model load.

The engine works in a thread; the event handler is a generator that reports what the thread has reached about
twice a second. Cancel sets a flag the engine's progress callback returns (trainer.generate.GenerationCancelled).
The preview is trainer.preview's linear latent→RGB map: no decoder pass, no extra model.
"""
from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.generate import GenerationCancelled, Generator
from trainer.preview import fit_projection, latent_preview

POLL_S = 0.5
PREVIEW_EVERY_S = 1.0  # a preview costs a few milliseconds, but each one is a picture sent to the browser


@dataclass
class Progress:
    """What the worker thread has reached; read by the handler, written by the engine's callback."""
    phase: str = "waiting"  # waiting | loading | running | done | cancelled | failed
    step: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    first_step_at: float | None = None  # the first step includes warm-up: time left counts from after it
    preview: Any = None  # the newest preview picture, taken by the handler
    result: Any = None
    error: BaseException | None = None

    def time_left(self) -> float | None:
        if self.first_step_at is None or self.step < 2:
            return None
        per_step = (time.time() - self.first_step_at) / (self.step - 1)
        return per_step * (self.total - self.step)


def progress_html(p: Progress, what: str = "picture") -> str:
    """The bar under the Generate button; data-* attributes let tests wait on the real state."""
    if p.phase == "loading":
        text = f"Loading the base model (only the first time, or after changing it): {time.time() - p.started:.0f} s"
    elif p.phase == "running":
        left = p.time_left()
        text = f"{what}: step {p.step} / {p.total}" + (f" · {left:.0f} s left" if left is not None else "")
    elif p.phase == "cancelled":
        text = f"Cancelled at step {p.step} of {p.total}."
    elif p.phase == "done":
        text = f"Done: {p.total} steps in {time.time() - p.started:.1f} s."
    else:
        text = ""
    bar = f'<progress value="{p.step}" max="{max(p.total, 1)}" style="width:100%"></progress>' if p.total else ""
    return (f'<div id="gen-progress-text" data-phase="{p.phase}" data-step="{p.step}" data-total="{p.total}">'
            f"{html.escape(text)}{bar}</div>")


class LiveGeneration:
    """One generation at a time (the app's Generator holds one pipeline); Cancel reaches the running one."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.cancel_flag = threading.Event()
        self._projection: tuple[str, Any] | None = None  # (base model path, fitted map)

    def cancel(self) -> str:
        self.cancel_flag.set()
        return "Cancelling: the picture stops at its next step."

    def _projection_for_base(self):
        key = str(self.gen.base_path)
        if self._projection is None or self._projection[0] != key:
            self._projection = (key, fit_projection(self.gen.pipe.vae))
        return self._projection[1]

    def run(self, base: str, work: Callable[[Callable], Any], total: int):
        """Yield Progress snapshots while `work(progress_callback)` runs in a thread; the last one is final."""
        self.cancel_flag.clear()
        p = Progress(total=total)
        offset = {"done": 0}  # steps of earlier pictures (a sweep makes several)
        last_preview = [0.0]

        def callback(step: int, steps: int, latents) -> bool:
            now = time.time()
            if step == 1 and offset["done"] == 0:
                p.first_step_at = now
            p.step = offset["done"] + step
            if step == steps:
                offset["done"] += steps
            if now - last_preview[0] >= PREVIEW_EVERY_S or step == steps:
                last_preview[0] = now
                p.preview = latent_preview(latents, self._projection_for_base(), size=(256, 256))
            return self.cancel_flag.is_set()

        def worker() -> None:
            try:
                if self.gen.pipe is None or self.gen.base_path != Path(base).resolve():
                    p.phase = "loading"
                    self.gen.load(base)
                p.phase, p.started = "running", time.time()
                p.result = work(callback)
                p.phase = "done"
            except GenerationCancelled:
                p.phase = "cancelled"
            except BaseException as e:  # noqa: BLE001 - handed to the handler, which shows it
                p.error, p.phase = e, "failed"

        thread = threading.Thread(target=worker, name="generate", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            yield p
        yield p
