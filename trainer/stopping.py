"""A prompt stop: SIGTERM / SIGINT (or the UI's Stop) take effect within one micro-batch, during the caches and
during sampling too, and the checkpoint written then is that of the last completed optimiser step.

With gradient accumulation an optimiser step is many micro-batches (a stop used to wait 21 minutes for one).
A stop in the middle of one drops its partial gradients and rewinds the data position and the random generators
to where the step began (`Window`), so the checkpoint continues exactly like an uninterrupted run.
"""
from __future__ import annotations

import copy
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class StopRequested:
    """Set by SIGTERM/SIGINT (or by a caller); the loop checks it after every micro-batch. `at_step`: a caller's
    stop once that many optimiser steps are done (as if Stop were pressed right then)."""

    def __init__(self, at_step: int | None = None):
        self.flag = False
        self.at_step = at_step

    def __call__(self, *_):
        self.flag = True

    def step_done(self, step: int) -> None:
        if self.at_step is not None and step >= self.at_step:
            self.flag = True


def stop_signals() -> tuple[int, ...]:
    """SIGTERM (the UI's Stop on Linux/macOS), SIGINT (Ctrl+C), and on Windows SIGBREAK: the UI's Stop sends
    CTRL_BREAK_EVENT to the trainer's process group there, which Python delivers as SIGBREAK."""
    return (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())


@contextmanager
def stop_on_signals(stop: StopRequested) -> Iterator[None]:
    """While training, the stop signals set `stop`; the previous handlers come back afterwards. Handlers can only
    be set from the main thread (a notebook or a test may train in another, and stop through `stop`)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def any_process(flag: bool, accelerator) -> bool:
    """True on every process when it is true on one: they must all stop (or checkpoint) at the same step, or the
    others would wait forever in the next all-reduce."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=accelerator.device)
    return accelerator.reduce(value, "sum").item() > 0


class Stopped(Exception):
    """A stop asked for before the first optimiser step of this process: there is nothing new to checkpoint."""


def check(stop: StopRequested | None) -> None:
    """For loops that are not steps (caching, encoding): raise Stopped when a stop was asked for."""
    if stop is not None and stop.flag:
        raise Stopped()


@dataclass
class Window:
    """Where an optimiser step's micro-batches began: the position, the shared noise generator and this
    process's torch (and CUDA) RNG, which LoRA dropout draws from."""
    position: object
    noise_rng: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None

    @classmethod
    def take(cls, position, noise_rng: torch.Generator, device: torch.device) -> "Window":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(copy.copy(position), noise_rng.get_state(), torch.get_rng_state(), cuda)

    def rewind(self, position, noise_rng: torch.Generator, device: torch.device) -> None:
        """Put everything back to the start of the step (in place: `position` is shared with the run)."""
        position.__dict__.update(copy.copy(self.position).__dict__)
        noise_rng.set_state(self.noise_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
