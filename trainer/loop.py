"""The training loop. Reads top to bottom: `train` → `_prepare` (model, data, network, caches, optimiser, resume)
→ `steps` (micro-batch, loss, optimiser step, report, samples and checkpoints) → `_finish` (the export).

Several processes (`accelerate launch`) split each global batch: every process draws the whole batch's order,
noise and timesteps from the same seeded generators and keeps its own slice, so N processes at batch b train
exactly like one process at batch N·b (DDP averages the gradients).
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from tqdm import tqdm

from . import preflight
from .atomic import atomic_path
from .caches import all_latents, encode_latents, text_outputs
from .checkpoint import (Position, capture, checkpoint_lora, find_resume_checkpoint, latest_checkpoint, restore,
                         save_checkpoint)
from .config import TrainConfig, save_config
from .conditioning import encode_text, sdxl_time_ids
from .data import Dataset, load_dataset
from .events import EventLog, Pace
from .judge import Judge, begin, default_sample_prompts, make_judge, measure, split_validation
from .export_run import export_lora, thumbnail
from .memory import keep_freed_memory, return_big_blocks_to_the_os, trim_heap
from .metadata import RunInfo, base_model_name
from .models import BaseModel, default_base_model, load_base_model
from .network import ADAPTER, lora_parameters, lora_state
from .optim import make_optimizer, make_scheduler
from .precision import make_accelerator, resolve_precision
from .run_folder import claim
from .run_network import add_network
from .sampling import encode_samples, render_samples
from .step_guard import CheckpointClock, NonFiniteGuard, check_weights, kept, step_is_finite
from .stopping import StopRequested, Stopped, Window, any_process, check, stop_on_signals


@dataclass
class Run:
    """Everything `_prepare` sets up; the steps change only `pos` (and the LoRA weights, optimiser, RNGs)."""
    cfg: TrainConfig
    accelerator: Accelerator
    precision: str
    weight_dtype: torch.dtype
    base_path: Path
    base: BaseModel
    ds: Dataset
    global_batch: int  # micro-batch size summed over the processes
    steps_per_epoch: int  # optimiser steps (one per grad_accum batches), as `step` events count
    total_steps: int
    parts: dict[str, torch.nn.Module]  # the trained modules by name: unet, text_encoder(s) when trained
    latents: dict[tuple[int, bool], torch.Tensor]  # (image, flip) → latent; empty: encoded at each step
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # caption → outputs; empty: encoded each step
    sample_prompts: list[str]
    sample_embeds: list[dict[str, torch.Tensor]]  # empty: the encoders are live
    optimizer: torch.optim.Optimizer
    scheduler: object
    noise_rng: torch.Generator  # noise and timesteps of the whole global batch, the same on every process
    started: float
    optimizer_name: str = ""  # the class, e.g. AdamW8bit (accelerate wraps the optimizer)
    pos: Position = field(default_factory=Position)
    resumed_from: Path | None = None
    checkpointed: int = -1  # the step of the newest checkpoint this process wrote
    judge: Judge | None = None  # measures each checkpoint (main process, evaluation.at_checkpoints = auto)
    unet_fwd: torch.nn.Module | None = None  # the modules as accelerate wrapped them (DDP) for the forward pass
    encoders_fwd: list = field(default_factory=list)
    trained_fwd: list = field(default_factory=list)

    @property
    def trained(self) -> list[torch.nn.Module]:
        return list(self.parts.values())

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: TrainConfig, resume: bool = False, stop: StopRequested | None = None,
          overwrite: bool = False) -> Path | None:
    """Train; returns the exported LoRA path, or None when stopped early (with a checkpoint of the last step done,
    if any). `overwrite`: a fresh run may replace another run's checkpoints in its folder (run_folder.py)."""
    probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.training.return_freed_memory:
        return_big_blocks_to_the_os()
    elif probe_device.type == "cpu":
        keep_freed_memory()  # activations live in host memory: reuse freed blocks, no page faults (memory.py)
    precision = resolve_precision(cfg.training.mixed_precision, probe_device)
    accelerator = make_accelerator(precision, cpu=probe_device.type == "cpu",
                                   unused_parameters=cfg.network.train_text_encoder)
    held = None
    if accelerator.is_main_process:  # before any event: a refused run writes nothing into another run's folder
        preflight.check_writable(cfg.run_path(), "the run folder")
        preflight.check_writable(cfg.output_path().parent, "the LoRA folder")
        held = claim(cfg, resume, overwrite)
    events = EventLog(cfg.run_path(), enabled=accelerator.is_main_process)
    stop = stop or StopRequested()
    try:
        with stop_on_signals(stop):
            return _train(cfg, resume, stop, accelerator, precision, events)
    except Stopped:  # before this process's first step: the checkpoint it resumed from (if any) is the newest
        last = latest_checkpoint(cfg.run_path()) if resume else None
        events.emit("stopped", step=int(last.name.split("_")[1]) if last else 0, checkpoint=last and str(last))
        return None
    except Exception as e:
        events.emit("error", message=" ".join(f"{type(e).__name__}: {e}".split()))
        raise
    finally:
        if held is not None:
            held.release()


def _train(cfg: TrainConfig, resume: bool, stop: StopRequested, accelerator: Accelerator, precision: str,
           events: EventLog) -> Path | None:
    run = _prepare(cfg, resume, accelerator, precision, events, stop)
    events.emit("start", run=cfg.output.name, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                family=run.base.family.name, base_model=str(run.base_path),
                resumed_from=str(run.resumed_from) if run.resumed_from else None,
                resumed_step=run.pos.step if run.resumed_from else None, precision=precision,
                processes=accelerator.num_processes, latent_cache=bool(run.latents), text_cache=bool(run.text_cache))
    begin(run, lambda: _sample(run, stop, events))  # the base model's pictures: samples at step 0, the judge's
    if not drive(steps(run, stop, events)):
        return None
    return _finish(run, stop, events)


# ---- Set-up ---------------------------------------------------------------------------------------------------

def _prepare(cfg: TrainConfig, resume: bool, accelerator: Accelerator, precision: str, events: EventLog,
             stop: StopRequested, base: BaseModel | None = None, adapter: str = ADAPTER) -> Run:
    """`base`: one loaded for several runs (multi_run.py), which then frees the shared modules and prepares the
    trained ones with accelerate itself, once for all the runs."""
    tr, device, shared = cfg.training, accelerator.device, base is not None
    run_dir, started = cfg.run_path(), time.time()
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.toml")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    # Model: the frozen base, in the training precision (LoRA weights stay fp32).
    base_path = Path(cfg.model.base_model) if cfg.model.base_model else default_base_model()
    if not shared:
        base = load_base_model(base_path, family=cfg.model.family, dtype=weight_dtype)
        for m in (base.unet, base.vae, *base.text_encoders):
            m.to(device)
    preflight.check_clip_skip(cfg.model.clip_skip, base.text_encoders)
    preflight.check_memory(cfg, base.unet, base.vae, device, torch.finfo(weight_dtype).bits // 8)

    # Data: every image decoded and checked up front.
    ds = load_dataset(cfg.data, tr.seed)
    held_out = split_validation(ds, cfg.data.validation_split)  # every process trains on the same images
    events.emit("dataset", lines=ds.report.lines(), images=len(ds.images), skipped=len(ds.report.skipped))
    check(stop)  # a stop during loading takes effect here, before the network and the caches
    global_batch = tr.batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(ds.batches_per_epoch(global_batch) / tr.grad_accum)
    total_steps = tr.epochs * steps_per_epoch if tr.epochs > 0 else tr.steps

    parts = add_network(cfg, base, device, adapter)
    sample_prompts = cfg.sample.prompts or default_sample_prompts([r.caption for r in ds.images])
    judge = make_judge(cfg, ds, base, held_out, sample_prompts, accelerator, started)  # before the caches
    if accelerator.is_main_process:
        n_params = sum(p.numel() for m in parts.values() for p in lora_parameters(m))
        preflight.check_space(run_dir, cfg.output_path().parent, n_params, cfg)

    # Caches: VAE latents (when augmentation is deterministic) and text-encoder outputs (when frozen).
    latents = {}
    if cfg.data.cache_latents != "off" and not ds.random_crop:
        latents = all_latents(ds, cfg, run_dir.parent / ".cache" / "latents", base, accelerator, stop, not shared)
    text_cache = {}
    if not cfg.network.train_text_encoder and ds.captions_fixed and tr.cache_text_encoder_outputs == "auto":
        text_cache = text_outputs([r.caption for r in ds.images], base.text_encoders, base.tokenizers,
                                  cfg.model.clip_skip, accelerator, stop)
    sample_embeds = []
    if text_cache:
        # Nothing needs the frozen encoders again once the sample prompts are encoded too: free them (CLIP-L is
        # 0.5 GB in fp32, SDXL's pair 3.3 GB), so peak memory stays at or below a loop that keeps them.
        sample_embeds = encode_samples(sample_prompts, cfg, base.text_encoders, base.tokenizers, accelerator)
        for te in [] if shared else base.text_encoders:
            te.to("meta")

    # Optimiser and LR schedule.
    opt = cfg.optimizer
    groups = [{"params": lora_parameters(base.unet), "lr": opt.unet_lr or opt.learning_rate}]
    if cfg.network.train_text_encoder:
        groups.append({"params": [p for te in base.text_encoders for p in lora_parameters(te)],
                       "lr": opt.text_encoder_lr or opt.learning_rate})
    optimizer = make_optimizer(opt, groups)
    run = Run(cfg, accelerator, precision, weight_dtype, base_path, base, ds, global_batch, steps_per_epoch,
              total_steps, parts, latents, text_cache, sample_prompts, sample_embeds, optimizer,
              make_scheduler(opt, optimizer, total_steps), torch.Generator().manual_seed(tr.seed), started)
    run.optimizer_name, run.judge = type(optimizer).__name__, judge

    # Resume: weights, optimiser, schedule, RNG and the position in the data stream.
    torch.manual_seed(tr.seed + accelerator.process_index)  # LoRA dropout: per process, like separate GPUs
    if resume:
        run.resumed_from = find_resume_checkpoint(run_dir)
        run.pos = restore(run.resumed_from, parts, optimizer, run.scheduler, run.noise_rng, accelerator)
        run.checkpointed = run.pos.step  # a stop before the next step keeps that checkpoint, not a copy
    if shared:
        return run
    *run.trained_fwd, run.optimizer = accelerator.prepare(*run.trained, optimizer)
    run.unet_fwd = run.trained_fwd[0]
    run.encoders_fwd = run.trained_fwd[1:] if cfg.network.train_text_encoder else base.text_encoders
    return run


# ---- The steps: a flat stream of micro-batches, epoch after epoch -----------------------------------------------

def drive(stream):
    """Runs a generator to its end; its return value."""
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value


def steps(run: Run, stop: StopRequested, events: EventLog):
    """Trains to the last step (returns True) or until a stop is requested (False, after a checkpoint); yields
    after every optimiser step (several runs on one base take turns: multi_run.py)."""
    cfg, tr, pos, accelerator = run.cfg, run.cfg.training, run.pos, run.accelerator
    rank, device = accelerator.process_index, accelerator.device
    trim_heap()  # the set-up's freed buffers (full-resolution VAE encoding, loading) are not the steps' sizes
    progress = tqdm(total=run.total_steps, initial=pos.step, disable=not run.main, desc=cfg.output.name, unit="step")
    micro, loss_sum, pace = 0, 0.0, Pace()
    guard, clock = NonFiniteGuard(cfg, run.precision), CheckpointClock(cfg.output.save_every_n_minutes)
    window = Window.take(pos, run.noise_rng, device)  # where this optimiser step's micro-batches began
    batches, batches_epoch = None, None
    while pos.step < run.total_steps:
        if batches_epoch != pos.epoch:
            batches, batches_epoch = run.ds.epoch_batches(pos.epoch, run.global_batch), pos.epoch
        draws = batches[pos.batch_index][rank * tr.batch_size:(rank + 1) * tr.batch_size]
        pos.batch_index += 1
        epoch_end = pos.batch_index >= len(batches)
        if epoch_end:  # the position always names the next micro-batch, which checkpoints store
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
        micro += 1
        sync = micro % tr.grad_accum == 0
        with ExitStack() as stack:
            if not sync:  # accumulate locally; DDP all-reduces only on the last micro-batch
                for m in run.trained_fwd:
                    stack.enter_context(accelerator.no_sync(m))
            loss = _loss(run, draws)
            accelerator.backward(loss / tr.grad_accum)
        loss_sum = loss_sum + loss.detach().float() / tr.grad_accum  # a tensor: read once per step, not per micro-batch
        if not sync:
            if any_process(stop.flag, accelerator):  # a stop within one micro-batch: the step is dropped
                window.rewind(pos, run.noise_rng, device)
                run.optimizer.zero_grad(set_to_none=True)
                return _stopped(run, events, progress)
            continue

        # Optimiser step, unless the loss or the gradients are not finite (then skipped and counted).
        loss_sum = accelerator.reduce(loss_sum, "mean") if accelerator.num_processes > 1 else loss_sum
        done = _optimizer_step(run, loss_sum, guard)
        window = Window.take(pos, run.noise_rng, device)
        if done:
            _report(run, loss_sum, pace, progress, events)
        else:
            events.emit("skipped", step=pos.step + 1, in_a_row=guard.in_row, skipped=guard.skipped)
            guard.check()  # too many in a row: stop, naming the likely cause
        loss_sum = 0.0
        stop.step_done(pos.step)

        # Samples, checkpoints, a requested stop.
        last = pos.step >= run.total_steps
        if done and run.main and cfg.sample.every_n_steps and pos.step % cfg.sample.every_n_steps == 0 and not last:
            _sample(run, stop, events)
        every_steps = cfg.output.save_every_n_steps and pos.step % cfg.output.save_every_n_steps == 0
        every_epochs = (cfg.output.save_every_n_epochs and epoch_end
                        and pos.epoch % cfg.output.save_every_n_epochs == 0)
        if done and not last and any_process(bool(every_steps or every_epochs) or clock.due(), accelerator):
            _checkpoint(run, events)
            clock.reset()
        pace.paused()
        if not last and any_process(stop.flag, accelerator):
            return _stopped(run, events, progress)
        yield
    progress.close()
    return True


def _stopped(run: Run, events: EventLog, progress: tqdm) -> bool:
    """A checkpoint of the last completed optimiser step (none before the first; not twice), then `stopped`.
    Not measured: a stop should be prompt; the resumed run is measured at its next checkpoint."""
    progress.close()
    path = (latest_checkpoint(run.cfg.run_path()) if run.checkpointed == run.pos.step
            else _checkpoint(run, events, evaluate=False) if run.pos.step > 0 else None)
    events.emit("stopped", step=run.pos.step, checkpoint=str(path) if path else None)
    return False


def _optimizer_step(run: Run, loss: torch.Tensor, guard: NonFiniteGuard) -> bool:
    """Clip, step, schedule; False (nothing changed) when the loss or the gradients are NaN/inf."""
    opt = run.cfg.optimizer
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    # Under fp16 the GradScaler skips overflowing gradients itself (and lowers its scale): only the loss counts.
    finite = step_is_finite(loss, params, check_grads=run.accelerator.scaler is None)
    guard.record(finite)
    if finite:
        if opt.max_grad_norm > 0:
            run.accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.pos.step += 1
    run.optimizer.zero_grad(set_to_none=True)
    return finite


def _report(run: Run, loss_sum: torch.Tensor, pace: Pace, progress: tqdm, events: EventLog) -> None:
    """The step event: loss (already averaged over the processes), speed (smoothed), ETA."""
    step, loss = run.pos.step, loss_sum.item()
    it_s, eta_s = pace.step(run.total_steps - step)
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}")
    events.emit("step", step=step, total=run.total_steps, epoch=run.pos.epoch, loss=round(loss, 6),
                lr=run.scheduler.get_last_lr()[0], it_s=it_s, eta_s=eta_s)


def _loss(run: Run, draws) -> torch.Tensor:
    """The mean diffusion loss of this process's slice of one global batch."""
    cfg, ds, accelerator, base = run.cfg, run.ds, run.accelerator, run.base
    tr, bs, device, dtype = cfg.training, cfg.training.batch_size, accelerator.device, run.weight_dtype
    noise_scheduler, rank, global_batch = base.noise_scheduler, accelerator.process_index, run.global_batch
    # Latents [b, 4, h/8, w/8]: from the cache, or encoded now.
    if run.latents:
        latents = torch.stack([run.latents[(d.image, d.flip)] for d in draws]).to(device)
        crops = [ds.crop_top_left(d) for d in draws]
    else:
        pixels, crops = zip(*(ds.load_pixels(d) for d in draws))
        with torch.no_grad():
            latents = encode_latents(base.vae, torch.stack(pixels).to(device))
    latents = latents.float()

    # Noise and timesteps for the whole global batch from the shared generator; keep this process's slice.
    sl, noise_rng = slice(rank * bs, (rank + 1) * bs), run.noise_rng
    shape = (global_batch,) + tuple(latents.shape[1:])
    noise = torch.randn(shape, generator=noise_rng)[sl]
    high = min(tr.max_timestep or noise_scheduler.config.num_train_timesteps, noise_scheduler.config.num_train_timesteps)
    timesteps = torch.randint(tr.min_timestep, high, (global_batch,), generator=noise_rng)[sl]
    if tr.noise_offset:
        # Offset noise lets the model shift the mean brightness (very dark / bright images).
        noise = noise + tr.noise_offset * torch.randn((global_batch, shape[1], 1, 1), generator=noise_rng)[sl]
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    # Text conditioning: cached when the encoders are frozen and captions fixed.
    captions, is_sdxl = [d.caption for d in draws], base.family.is_sdxl
    if run.text_cache:
        emb = torch.stack([run.text_cache[c][0] for c in captions]).to(device)
        pooled = torch.stack([run.text_cache[c][1] for c in captions]).to(device) if is_sdxl else None
    else:
        with torch.set_grad_enabled(cfg.network.train_text_encoder), accelerator.autocast():
            emb, pooled = encode_text(run.encoders_fwd, base.tokenizers, captions, cfg.model.clip_skip, device)
    added = None
    if is_sdxl:
        records = [ds.images[d.image] for d in draws]
        time_ids = sdxl_time_ids([r.original_size for r in records], crops, [r.bucket for r in records])
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}

    # Predict the noise (epsilon) or the velocity (v-prediction models), per-sample MSE.
    with accelerator.autocast():
        pred = run.unet_fwd(noisy.to(dtype), timesteps, emb.to(dtype), added_cond_kwargs=added).sample
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    # Min-SNR-γ weighting (Hang et al. 2023): stops easy, low-noise timesteps from dominating.
    if tr.min_snr_gamma:
        alphas = noise_scheduler.alphas_cumprod.to(device)[timesteps]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=tr.min_snr_gamma) / (snr + 1 if v_pred else snr)
        loss = loss * weight
    # Regularisation images carry the prior-loss weight.
    loss_weight = torch.tensor([ds.images[d.image].loss_weight for d in draws], device=device)
    return (loss * loss_weight).mean()


# ---- Samples, checkpoints and the export ------------------------------------------------------------------------

def _sample(run: Run, stop: StopRequested, events: EventLog) -> list[str]:
    """The sample images of this step; a stop cuts them short (the paths made so far)."""
    paths = render_samples(run.cfg.run_path() / "samples", f"step_{run.pos.step:06d}", run.cfg, run.base,
                           run.sample_prompts, run.sample_embeds, run.trained, run.accelerator, stop)
    events.emit("sample", step=run.pos.step, paths=paths, prompts=run.sample_prompts[:len(paths)])
    return paths


def _checkpoint(run: Run, events: EventLog, evaluate: bool = True) -> Path | None:
    """Every process takes part (their RNG states are gathered); the main process writes and exports."""
    captured = capture(run.pos, run.parts, run.optimizer, run.scheduler, run.noise_rng, run.accelerator,
                       dataclasses.asdict(_info(run)))  # run_info: for `python -m trainer export` (export_run.py)
    path = None
    if captured is not None:
        lora, state = captured
        check_weights(lora, run.cfg, run.pos.step)
        path = save_checkpoint(run.cfg.run_path(), run.pos.step, lora, state)
        lora_file = export_lora(run.cfg, lora, checkpoint_lora(run.cfg.run_path(), run.cfg.output.name, run.pos.step),
                                _info(run), run.base.family.is_sdxl)  # a loadable file, kept when folders are pruned
        events.emit("checkpoint", step=run.pos.step, path=str(path), lora=str(lora_file))
        if evaluate:
            measure(run, lora_file, events)  # `evaluation` and `recommendation`, with evaluation on
    run.checkpointed = run.pos.step
    run.accelerator.wait_for_everyone()
    return path


def _finish(run: Run, stop: StopRequested, events: EventLog) -> Path:
    """A last checkpoint, then the LoRA in kohya format with its metadata, and only then the last samples and a
    preview beside it (the file is written again with the thumbnail): a failing sample never costs the LoRA, and
    a failing export (a full or read-only disk) leaves the checkpoint and says how to export it later."""
    cfg, out = run.cfg, run.cfg.output_path()
    _checkpoint(run, events)
    if run.main:
        lora = {name: lora_state(m) for name, m in run.parts.items()}
        try:
            export_lora(cfg, lora, out, _info(run), run.base.family.is_sdxl)
        except OSError as e:
            raise OSError(e.errno, f"could not write the LoRA {out} ({e.strerror or e}); {kept(cfg)}") from e
        events.emit("saved", path=str(out), step=run.pos.step)
        paths = _sample(run, stop, events)
        if paths:
            with Image.open(paths[0]) as im:
                with atomic_path(out.with_name(f"{out.stem}.preview.png")) as tmp:
                    im.save(tmp, format="PNG")  # A1111's preview convention
                export_lora(cfg, lora, out, _info(run, thumbnail(im)), run.base.family.is_sdxl)
        events.emit("done", path=str(out), step=run.pos.step, seconds=round(time.time() - run.started, 1))
    run.accelerator.wait_for_everyone()
    return out


def _info(run: Run, thumbnail: str = "") -> RunInfo:
    family, ds = run.base.family, run.ds
    return RunInfo(family.base_model_version, family.architecture, family.prediction_type,
                   base_model_name(run.base_path), run.pos.step, run.pos.epoch, len(ds.images), run.started,
                   run.precision, run.optimizer_name, ds.tag_frequency, ds.dataset_dirs, ds.bucket_info, thumbnail)
