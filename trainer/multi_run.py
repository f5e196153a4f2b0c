"""Several LoRAs trained together in one process on one loaded copy of the frozen base model.

`python -m trainer train --config a.toml --config b.toml …`: the base model (its UNet, VAE and text encoders, the
bulk of a run's memory) is loaded once. Everything else stays per run, as in a run alone (loop.py): dataset,
caches, optimiser, schedule, noise generator, torch RNG (LoRA dropout), events.jsonl, samples, checkpoints, locks
and output file. Each run has its own PEFT adapter on the shared UNet (and text encoders when it trains them).

The runs take turns one optimiser step at a time (loop.steps yields after each). Before its turn a run's adapter
becomes the only active one, the others' text-encoder adapters are switched off, and its own torch RNG state is
put in place (and taken back after), so each run does exactly the arithmetic it does alone: with the same seeds
its LoRA equals the one trained alone bit for bit (tests/test_multi_run.py). A run that fails (a refused folder,
NaN divergence) ends with its own `error` event and the others go on; a stop (SIGINT/SIGTERM) stops every run
after its current step, each with its checkpoint, and `--resume` continues each from its own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import preflight
from .caches import drop_vae_encoder
from .checkpoint import latest_checkpoint
from .config import ConfigError, TrainConfig
from .events import EventLog
from .judge import begin
from .loop import Run, _finish, _prepare, _sample, steps
from .memory import keep_freed_memory, return_big_blocks_to_the_os
from .models import default_base_model, load_base_model
from .network import use_adapter
from .precision import make_accelerator, resolve_precision
from .run_folder import claim
from .stopping import StopRequested, Stopped, stop_on_signals

# Settings of the shared modules themselves: every run of one process must agree on them.
SHARED = ("model.base_model", "model.family", "training.mixed_precision", "training.gradient_checkpointing",
          "training.attention_memory_mb", "training.return_freed_memory")


class MultiRunError(ConfigError):
    """Configs that cannot train together in one process."""


def _value(cfg: TrainConfig, key: str):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if key == "model.base_model":  # "" is the demo model: compare the folders themselves
        return str(Path(value).resolve() if value else default_base_model().resolve())
    if key == "training.mixed_precision":  # "auto" and what it means on this machine are the same
        return resolve_precision(value, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return value


def check_together(cfgs: list[TrainConfig]) -> None:
    """MultiRunError naming the first setting two configs differ in, or a run folder / LoRA file they share."""
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for key in SHARED:
            if _value(cfg, key) != _value(first, key):
                raise MultiRunError(
                    f"`{key}` is {_value(first, key)!r} in run {first.output.name} but {_value(cfg, key)!r} in run "
                    f"{cfg.output.name}: runs trained together share one base model; give every config the same "
                    f"`{key}`, or train them one at a time")
    for what, paths in (("run folder", [c.run_path().resolve() for c in cfgs]),
                        ("LoRA file", [c.output_path().resolve() for c in cfgs])):
        if len(set(paths)) < len(paths):
            twice = next(p for p in paths if paths.count(p) > 1)
            raise MultiRunError(f"two of the configs write the same {what} {twice}: give each run its own "
                                "`output.name` (or `output.run_dir`)")


@dataclass
class Member:
    """One run of several: its own state between turns."""
    cfg: TrainConfig
    adapter: str
    events: EventLog | None = None  # once its folder is claimed: a refused run writes nothing into another's
    held: object = None  # run_folder.Claim
    accelerator: object = None
    run: Run | None = None
    stream: Iterator | None = None
    rng: torch.Tensor | None = None  # the torch RNG between turns (LoRA dropout)
    cuda_rng: torch.Tensor | None = None
    result: Path | BaseException | None = None
    over: bool = False


def train_many(cfgs: list[TrainConfig], resume: bool = False, stop: StopRequested | None = None,
               overwrite: bool = False) -> list[Path | BaseException | None]:
    """Train every config together; per run, in order: the exported LoRA, None (stopped) or the exception it
    failed with (its `error` event written). Refuses (MultiRunError) configs that do not share a base."""
    check_together(cfgs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfgs[0].training.return_freed_memory:
        return_big_blocks_to_the_os()
    elif device.type == "cpu":
        keep_freed_memory()
    precision = resolve_precision(cfgs[0].training.mixed_precision, device)
    members = [Member(cfg, f"run{i}_") for i, cfg in enumerate(cfgs)]
    stop = stop or StopRequested()
    try:
        with stop_on_signals(stop):
            for m in members:
                _guard(m, lambda m=m: _claim(m, resume, overwrite, precision, device), resume)
            _train_all([m for m in members if not m.over], resume, stop, precision, device)
    finally:
        for m in members:
            if m.held is not None:
                m.held.release()
    return [m.result for m in members]


def _claim(m: Member, resume: bool, overwrite: bool, precision: str, device: torch.device) -> None:
    preflight.check_writable(m.cfg.run_path(), "the run folder")
    preflight.check_writable(m.cfg.output_path().parent, "the LoRA folder")
    m.held = claim(m.cfg, resume, overwrite)
    m.events = EventLog(m.cfg.run_path())
    m.accelerator = make_accelerator(precision, cpu=device.type == "cpu",
                                     unused_parameters=m.cfg.network.train_text_encoder)
    if m.accelerator.num_processes > 1:
        raise MultiRunError("several configs train together in one process: start them without `accelerate "
                            "launch`, or launch each config on its own")


def _guard(m: Member, work: Callable[[], None], resume: bool) -> None:
    """`work` for one run; a stop before its first step or a failure ends that run alone, with its event."""
    try:
        work()
    except Stopped:
        last = latest_checkpoint(m.cfg.run_path()) if resume else None
        if m.events is not None:
            m.events.emit("stopped", step=int(last.name.split("_")[1]) if last else 0, checkpoint=last and str(last))
        m.over, m.result = True, None
    except Exception as e:  # noqa: BLE001 (each run's failure is its own: the error event, and the others go on)
        if m.events is not None:
            m.events.emit("error", message=" ".join(f"{type(e).__name__}: {e}".split()))
        m.over, m.result = True, e


def _train_all(members: list[Member], resume: bool, stop: StopRequested, precision: str,
               device: torch.device) -> None:
    if not members:
        return
    cfg = members[0].cfg
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    base_path = Path(cfg.model.base_model) if cfg.model.base_model else default_base_model()
    loaded = []

    def load() -> None:  # every run needs it: when it fails, each one ends with the same error
        if not loaded:
            loaded.append(load_base_model(base_path, family=cfg.model.family, dtype=weight_dtype))
    for m in members:
        _guard(m, load, resume)
    if not loaded:
        return
    base = loaded[0]
    for module in (base.unet, base.vae, *base.text_encoders):
        module.to(device)
    prepared: set[int] = set()
    for m in members:
        _guard(m, lambda m=m: _prepare_member(m, resume, stop, precision, base, prepared), resume)
    live = [m for m in members if not m.over]
    _free_shared(base, [m.run for m in live])
    for m in live:
        _guard(m, lambda m=m: _begin(m, base, stop, precision), resume)
    live = [m for m in live if not m.over]
    while live:  # one optimiser step of each run in turn
        for m in live:
            _guard(m, lambda m=m: _turn(m, base, stop), resume)
        live = [m for m in live if not m.over]


def _prepare_member(m: Member, resume: bool, stop: StopRequested, precision: str, base, prepared: set) -> None:
    acc = m.accelerator
    m.run = run = _prepare(m.cfg, resume, acc, precision, m.events, stop, base=base, adapter=m.adapter)
    run.optimizer = acc.prepare(run.optimizer)
    for module in run.trained:  # accelerate wraps a module's forward (autocast): once, by the first run training it
        if id(module) not in prepared:
            acc.prepare_model(module)
            prepared.add(id(module))
    run.trained_fwd, run.unet_fwd = run.trained, base.unet
    run.encoders_fwd = run.trained[1:] if m.cfg.network.train_text_encoder else base.text_encoders
    m.rng = torch.get_rng_state()
    m.cuda_rng = torch.cuda.get_rng_state(acc.device) if acc.device.type == "cuda" else None


def _free_shared(base, runs: list[Run]) -> None:
    """What a run alone frees after its caches, once no run needs it (loop._prepare): the text encoders when every
    run has its text outputs cached, the VAE's encoder when every run has its latents."""
    if runs and all(r.text_cache for r in runs):
        for te in base.text_encoders:
            te.to("meta")
    if runs and all(r.latents for r in runs) and base.vae.encoder is not None:
        drop_vae_encoder(base.vae)


@contextmanager
def _active(m: Member, base) -> Iterator[None]:
    """This run's adapter, text-encoder mode and RNG in place; its RNG taken back afterwards."""
    use_adapter([base.unet, *base.text_encoders], m.adapter)
    for te in base.text_encoders:
        te.train(m.cfg.network.train_text_encoder)
    torch.set_rng_state(m.rng)
    if m.cuda_rng is not None:
        torch.cuda.set_rng_state(m.cuda_rng, m.accelerator.device)
    try:
        yield
    finally:
        m.rng = torch.get_rng_state()
        if m.cuda_rng is not None:
            m.cuda_rng = torch.cuda.get_rng_state(m.accelerator.device)


def _begin(m: Member, base, stop: StopRequested, precision: str) -> None:
    """What loop._train does between the set-up and the first step: the start event, the step-0 samples."""
    run, cfg = m.run, m.cfg
    with _active(m, base):
        m.events.emit("start", run=cfg.output.name, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                      family=base.family.name, base_model=str(run.base_path),
                      resumed_from=str(run.resumed_from) if run.resumed_from else None,
                      resumed_step=run.pos.step if run.resumed_from else None, precision=precision, processes=1,
                      latent_cache=bool(run.latents), text_cache=bool(run.text_cache), together=True)
        begin(run, lambda: _sample(run, stop, m.events))
    m.stream = steps(run, stop, m.events)


def _turn(m: Member, base, stop: StopRequested) -> None:
    """One optimiser step of this run; at its end, the export (or the checkpoint of a stop)."""
    with _active(m, base):
        try:
            next(m.stream)
            return
        except StopIteration as end:
            finished = end.value
        m.over = True
        m.result = _finish(m.run, stop, m.events) if finished else None
