"""The training loop. Reads top to bottom: set-up, model, data, network, caches, optimiser, resume, steps, export.

Several processes (`accelerate launch`) split each global batch: every process draws the whole batch's order,
noise and timesteps from the same seeded generators and keeps its own slice, so N processes at batch b train
exactly like one process at batch N·b (DDP averages the gradients).
"""
from __future__ import annotations

import base64
import io
import math
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from PIL import Image

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .conditioning import encode_text, sdxl_time_ids
from .config import ConfigError, TrainConfig, save_config
from .cpu_attention import use_cpu_training_attention
from .data import Draw, LatentCache, latent_key, load_dataset
from .events import EventLog, Pace
from .generate import encode_prompt, make_pipeline, render_embeds, to_unet_latents
from .lora_file import save_lora, to_diffusers, to_kohya, text_encoder_prefixes
from .metadata import RunInfo, base_model_name, build_metadata
from .models import default_base_model, load_base_model
from .lean import lean_forwards
from .memory import keep_freed_memory, release_file_pages, return_big_blocks_to_the_os, trim_heap
from .network import add_lora, load_lora_state, lora_parameters, lora_state
from .optim import make_optimizer, make_scheduler
from .precision import make_accelerator, resolve_precision


class StopRequested:
    """Set by SIGTERM/SIGINT (or by a caller); checked between optimiser steps."""

    def __init__(self):
        self.flag = False

    def __call__(self, *_):
        self.flag = True


def _parameters(*modules) -> list[torch.Tensor]:
    return [p for m in modules if m is not None for p in m.parameters()]


def part_names(n_encoders: int) -> list[str]:
    return ["text_encoder", "text_encoder_2"][:n_encoders]


def train(cfg: TrainConfig, resume: bool = False, stop: StopRequested | None = None) -> Path | None:
    """Train; returns the exported LoRA path, or None when stopped early (a checkpoint is saved then)."""
    probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.training.return_freed_memory:
        return_big_blocks_to_the_os()
    elif probe_device.type == "cpu":
        keep_freed_memory()  # activations live in host memory: reuse freed blocks, no page faults (memory.py)
    precision = resolve_precision(cfg.training.mixed_precision, probe_device)
    accelerator = make_accelerator(precision, cpu=probe_device.type == "cpu",
                                   unused_parameters=cfg.network.train_text_encoder)
    events = EventLog(cfg.run_path(), enabled=accelerator.is_main_process)
    stop = stop or StopRequested()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(cfg, resume, stop, accelerator, precision, events)
    except Exception as e:
        events.emit("error", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(cfg: TrainConfig, resume: bool, stop: StopRequested, accelerator: Accelerator, precision: str,
           events: EventLog) -> Path | None:
    tr, net, opt = cfg.training, cfg.network, cfg.optimizer
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    run_dir, started = cfg.run_path(), time.time()
    if main:
        save_config(cfg, run_dir / "config.toml")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    # --- Model: the frozen base, in the training precision (LoRA weights stay fp32) --------------------------
    base_path = Path(cfg.model.base_model) if cfg.model.base_model else default_base_model()
    base = load_base_model(base_path, family=cfg.model.family, dtype=weight_dtype)
    family, unet, vae, encoders, tokenizers = base.family, base.unet, base.vae, base.text_encoders, base.tokenizers
    noise_scheduler = base.noise_scheduler
    for m in (unet, vae, *encoders):
        m.to(device)

    # --- Data: every image decoded and checked up front ---------------------------------------------------------
    ds = load_dataset(cfg.data, tr.seed)
    events.emit("dataset", lines=ds.report.lines(), images=len(ds.images), skipped=len(ds.report.skipped))
    global_batch = tr.batch_size * world
    batches_per_epoch = len(ds.epoch_batches(0, global_batch))
    steps_per_epoch = math.ceil(batches_per_epoch / tr.grad_accum)
    total_steps = tr.epochs * steps_per_epoch if tr.epochs > 0 else tr.steps

    # --- Network: LoRA adapters on the UNet and (optionally) the text encoders --------------------------------
    torch.manual_seed(tr.seed)  # the same LoRA init on every process and in every run with this seed
    add_lora(unet, encoders, net)
    lean_forwards(unet)  # fewer activations kept for backward, same results (lean.py)
    if device.type == "cpu":
        use_cpu_training_attention(unet, tr.attention_memory_mb)  # bf16 attention without recomputation
    trained = [unet] + (encoders if net.train_text_encoder else [])
    names = ["unet"] + (part_names(len(encoders)) if net.train_text_encoder else [])
    if tr.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in trained[1:]:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for te in encoders:
        te.train(net.train_text_encoder)  # frozen encoders stay in eval mode (no dropout)
    unet.train()

    # --- Caches: VAE latents (when augmentation is deterministic) and text-encoder outputs (when frozen) ------
    latents_mem: dict[tuple[int, bool], torch.Tensor] = {}
    if cfg.data.cache_latents != "off" and not ds.random_crop:
        cache = LatentCache(run_dir.parent / ".cache" / "latents")
        flips = (False, True) if cfg.data.flip else (False,)
        if world > 1:  # each process encodes its share into the disk cache: one process encoding a large set
            # alone kept the others waiting past NCCL's 10-minute timeout
            _cached_latents(ds, flips, cache, base.identity, vae, device, share=(rank, world))
            accelerator.wait_for_everyone()
        latents_mem = _cached_latents(ds, flips, cache, base.identity, vae, device)
        # Every latent is cached: from here on the VAE only decodes samples. Its encoder (a third of the VAE,
        # 0.14 GB for SD's in fp32) is dropped, not moved to "meta": the pipelines ask the VAE for its device,
        # which is its first parameter's, and that would then be the encoder's "meta". An encoder read from a
        # memory-mapped file keeps its pages resident while the decoder maps the same file: drop them too.
        release_file_pages(_parameters(vae.encoder, getattr(vae, "quant_conv", None)))
        vae.encoder = None
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv = None
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if not net.train_text_encoder and ds.captions_fixed and tr.cache_text_encoder_outputs == "auto":
        with torch.no_grad(), accelerator.autocast():
            for caption in sorted({r.caption for r in ds.images}):
                emb, pooled = encode_text(encoders, tokenizers, [caption], cfg.model.clip_skip, device)
                # in host memory, like the latents: SDXL's are ~0.3 MB a caption, GBs on a GPU for a big set
                text_cache[caption] = (emb[0].cpu(), None if pooled is None else pooled[0].cpu())
    sample_prompts = cfg.sample.prompts or [ds.images[0].caption]
    sample_embeds: list[dict[str, torch.Tensor]] = []
    if text_cache:
        # Nothing needs the frozen encoders again once the sample prompts are encoded too: free them (CLIP-L is
        # 0.5 GB in fp32, SDXL's pair 3.3 GB), so peak memory stays at or below a loop that keeps them.
        with torch.no_grad(), accelerator.autocast():
            sample_embeds = [encode_prompt(encoders, tokenizers, p, cfg.sample.negative_prompt, cfg.model.clip_skip)
                             for p in sample_prompts]
        for te in encoders:
            te.to("meta")

    # --- Optimiser and LR schedule ----------------------------------------------------------------------------
    groups = [{"params": lora_parameters(unet), "lr": opt.unet_lr or opt.learning_rate}]
    if net.train_text_encoder:
        groups.append({"params": [p for te in encoders for p in lora_parameters(te)],
                       "lr": opt.text_encoder_lr or opt.learning_rate})
    optimizer = make_optimizer(opt, groups)
    optimizer_name = type(optimizer).__name__
    lr_scheduler = make_scheduler(opt, optimizer, total_steps)
    params = [p for g in groups for p in g["params"]]

    # --- Resume: weights, optimiser, schedule, RNG and the position in the data stream ------------------------
    noise_rng = torch.Generator().manual_seed(tr.seed)
    torch.manual_seed(tr.seed + rank)  # LoRA dropout: per process, like separate GPUs
    step, epoch, batch_index, resumed_from = 0, 0, 0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without --resume")
        lora, state = load_checkpoint(ckpt)
        for name, model in zip(names, trained):
            load_lora_state(model, lora[name])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"][min(rank, len(state["torch_rng"]) - 1)])
        if device.type == "cuda" and state.get("cuda_rng"):  # LoRA dropout on the GPU draws from its generator
            torch.cuda.set_rng_state(state["cuda_rng"][min(rank, len(state["cuda_rng"]) - 1)], device)
        if accelerator.scaler is not None and state.get("grad_scaler"):  # fp16: the loss scale it had reached
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        step, epoch, batch_index, resumed_from = state["step"], state["epoch"], state["batch_index"], str(ckpt)

    *trained_fwd, optimizer = accelerator.prepare(*trained, optimizer)
    unet_fwd = trained_fwd[0]
    encoders_fwd = trained_fwd[1:] if net.train_text_encoder else encoders

    events.emit("start", run=cfg.output.name, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                family=family.name, base_model=str(base_path), resumed_from=resumed_from, precision=precision,
                processes=world, latent_cache=bool(latents_mem), text_cache=bool(text_cache))

    def info(thumbnail: str = "") -> RunInfo:
        return RunInfo(family.base_model_version, family.architecture, family.prediction_type,
                       base_model_name(base_path), step, epoch, len(ds.images), started, precision,
                       optimizer_name, ds.tag_frequency, ds.dataset_dirs, ds.bucket_info, thumbnail)

    def checkpoint() -> Path | None:
        # Every process's RNGs (LoRA dropout) go into the one checkpoint the main process writes.
        def every_process(rng: torch.Tensor) -> list[torch.Tensor]:
            return list(accelerator.gather(rng.unsqueeze(0).to(device)).cpu() if world > 1 else rng.unsqueeze(0))
        rng_states = every_process(torch.get_rng_state())
        cuda_states = every_process(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
        path = None
        if main:
            lora = {name: lora_state(m) for name, m in zip(names, trained)}
            state = {"step": step, "epoch": epoch, "batch_index": batch_index, "optimizer": optimizer.state_dict(),
                     "scheduler": lr_scheduler.state_dict(), "noise_rng": noise_rng.get_state(),
                     "torch_rng": rng_states, "cuda_rng": cuda_states,
                     "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {}}
            path = save_checkpoint(run_dir, step, lora, state)
            _export(cfg, lora, path / f"{cfg.output.name}-step{step}.safetensors", info(), family)
            events.emit("checkpoint", step=step, path=str(path))
        accelerator.wait_for_everyone()
        return path

    def sample(tag: str) -> list[str]:
        trim_heap()  # the steps' freed activations, kept for the next step, need not sit under the decoder too
        width = cfg.sample.width or cfg.data.resolution
        height = cfg.sample.height or cfg.data.resolution
        live_encoders = [None] * len(encoders) if sample_embeds else encoders  # None: freed, embeddings ready
        pipe = make_pipeline(unet, vae, live_encoders, tokenizers, noise_scheduler, "euler")
        pipe.set_progress_bar_config(disable=True)
        for m in trained:
            m.eval()
        paths = []
        with accelerator.autocast():
            for i, prompt in enumerate(sample_prompts):
                embeds = sample_embeds[i] if sample_embeds else encode_prompt(
                    encoders, tokenizers, prompt, cfg.sample.negative_prompt, cfg.model.clip_skip)
                image = render_embeds(pipe, embeds, cfg.sample.seed + i, cfg.sample.steps, cfg.sample.cfg, width,
                                      height)
                path = run_dir / "samples" / f"{tag}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                paths.append(str(path))
        for m in trained:
            m.train()
        # A memory-mapped decoder's pages would stay resident through the steps; the next sample re-reads them.
        release_file_pages(_parameters(vae.decoder, getattr(vae, "post_quant_conv", None)))
        events.emit("sample", step=step, paths=paths, prompts=sample_prompts)
        return paths

    # --- The steps: a flat stream of micro-batches, epoch after epoch ----------------------------------------------
    trim_heap()  # the set-up's freed buffers (full-resolution VAE encoding, loading) are not the steps' sizes
    progress = tqdm(total=total_steps, initial=step, disable=not main, desc=cfg.output.name, unit="step")
    micro, loss_sum, pace = 0, 0.0, Pace()
    batches, batches_epoch = None, None
    while step < total_steps:
        if batches_epoch != epoch:
            batches, batches_epoch = ds.epoch_batches(epoch, global_batch), epoch
        draws = batches[batch_index][rank * tr.batch_size:(rank + 1) * tr.batch_size]
        batch_index += 1
        epoch_end = batch_index >= len(batches)
        if epoch_end:  # the position always names the next micro-batch, which checkpoints store
            epoch, batch_index = epoch + 1, 0
        micro += 1
        sync = micro % tr.grad_accum == 0
        with ExitStack() as stack:
            if not sync:  # accumulate locally; DDP all-reduces only on the last micro-batch
                for m in trained_fwd:
                    stack.enter_context(accelerator.no_sync(m))
            loss = _loss(cfg, ds, draws, global_batch, rank, latents_mem, text_cache, vae, encoders_fwd,
                         tokenizers, unet_fwd, noise_scheduler, noise_rng, family, device, accelerator, weight_dtype)
            accelerator.backward(loss / tr.grad_accum)
        loss_sum = loss_sum + loss.detach().float() / tr.grad_accum  # a tensor: read once per step, not per micro-batch
        if not sync:
            continue

        # Optimiser step: clip, step, schedule.
        if opt.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Report: loss averaged over the processes, speed (smoothed), ETA.
        loss_sum = (accelerator.reduce(loss_sum, "mean") if world > 1 else loss_sum).item()
        it_s, eta_s = pace.step(total_steps - step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_sum:.4f}")
        events.emit("step", step=step, total=total_steps, epoch=epoch, loss=round(loss_sum, 6),
                    lr=lr_scheduler.get_last_lr()[0], it_s=it_s, eta_s=eta_s)
        loss_sum = 0.0

        # Samples, checkpoints, a requested stop.
        if main and cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < total_steps:
            sample(f"step_{step:06d}")
        every_steps = cfg.output.save_every_n_steps and step % cfg.output.save_every_n_steps == 0
        every_epochs = cfg.output.save_every_n_epochs and epoch_end and epoch % cfg.output.save_every_n_epochs == 0
        if (every_steps or every_epochs) and step < total_steps:
            checkpoint()
        pace.paused()
        if _should_stop(stop, accelerator, device):
            path = checkpoint()
            events.emit("stopped", step=step, checkpoint=str(path) if path else None)
            progress.close()
            return None
    progress.close()

    # --- Export: kohya format + metadata, a preview image beside it ----------------------------------------------
    out = cfg.output_path()
    if main:
        paths = sample(f"step_{step:06d}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(paths[0]) as im:
            im.save(out.with_name(f"{out.stem}.preview.png"))  # A1111's preview convention
            lora = {name: lora_state(m) for name, m in zip(names, trained)}
            _export(cfg, lora, out, info(_thumbnail(im)), family)
        events.emit("saved", path=str(out), step=step)
        events.emit("done", path=str(out), step=step, seconds=round(time.time() - started, 1))
    accelerator.wait_for_everyone()
    return out


def _loss(cfg, ds, draws, global_batch, rank, latents_mem, text_cache, vae, encoders, tokenizers, unet,
          noise_scheduler, noise_rng, family, device, accelerator, weight_dtype) -> torch.Tensor:
    """The mean diffusion loss of this process's slice of one global batch."""
    tr, bs = cfg.training, cfg.training.batch_size
    # Latents [b, 4, h/8, w/8]: from the cache, or encoded now.
    if latents_mem:
        latents = torch.stack([latents_mem[(d.image, d.flip)] for d in draws]).to(device)
        crops = [ds.crop_top_left(d) for d in draws]
    else:
        pixels, crops = zip(*(ds.load_pixels(d) for d in draws))
        with torch.no_grad():
            latents = _encode(vae, torch.stack(pixels).to(device))
    latents = latents.float()

    # Noise and timesteps for the whole global batch from the shared generator; keep this process's slice.
    sl = slice(rank * bs, (rank + 1) * bs)
    shape = (global_batch,) + tuple(latents.shape[1:])
    noise = torch.randn(shape, generator=noise_rng)[sl]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (global_batch,), generator=noise_rng)[sl]
    if tr.noise_offset:
        # Offset noise lets the model shift the mean brightness (very dark / bright images).
        noise = noise + tr.noise_offset * torch.randn((global_batch, shape[1], 1, 1), generator=noise_rng)[sl]
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    # Text conditioning: cached when the encoders are frozen and captions fixed.
    captions = [d.caption for d in draws]
    if text_cache:
        emb = torch.stack([text_cache[c][0] for c in captions]).to(device)
        pooled = torch.stack([text_cache[c][1] for c in captions]).to(device) if family.is_sdxl else None
    else:
        with torch.set_grad_enabled(cfg.network.train_text_encoder), accelerator.autocast():
            emb, pooled = encode_text(encoders, tokenizers, captions, cfg.model.clip_skip, device)
    added = None
    if family.is_sdxl:
        records = [ds.images[d.image] for d in draws]
        time_ids = sdxl_time_ids([r.original_size for r in records], crops, [r.bucket for r in records])
        added = {"text_embeds": pooled.to(device, weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}

    # Predict the noise (epsilon) or the velocity (v-prediction models), per-sample MSE.
    with accelerator.autocast():
        pred = unet(noisy.to(weight_dtype), timesteps, emb.to(weight_dtype), added_cond_kwargs=added).sample
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


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    # The distribution's mean, not a sample: cached and uncached training then see identical latents.
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    return to_unet_latents(vae, latents)


@torch.no_grad()
def _cached_latents(ds, flips, cache, vae_identity, vae, device,
                    share: tuple[int, int] = (0, 1)) -> dict[tuple[int, bool], torch.Tensor]:
    """Every (image, flip) latent, from the disk cache or encoded once now; a warm cache never decodes.
    share = (k, n): only every n-th pair from the k-th, for n processes filling the cache together."""
    out = {}
    pairs = [(i, flip) for i in range(len(ds.images)) for flip in flips]
    for i, flip in pairs[share[0]::share[1]]:
        draw = Draw(image=i, flip=flip, caption="", crop_seed=0)  # centre crop: the seed is unused
        key = latent_key(ds.images[i], flip, ds.crop_top_left(draw), vae_identity)
        out[(i, flip)] = cache.get_or_encode(
            key, lambda: _encode(vae, ds.load_pixels(draw)[0][None].to(device))[0].float().cpu())
    return out


def _should_stop(stop: StopRequested, accelerator, device) -> bool:
    if accelerator.num_processes == 1:
        return stop.flag
    # Every process must stop at the same step, or the others would wait forever in the next all-reduce.
    flag = torch.tensor(1.0 if stop.flag else 0.0, device=device)
    return accelerator.reduce(flag, "sum").item() > 0


def _thumbnail(image) -> str:
    small = image.convert("RGB").copy()
    small.thumbnail((256, 256))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _export(cfg: TrainConfig, lora: dict[str, dict[str, torch.Tensor]], path: Path, info: RunInfo, family) -> Path:
    dtype = torch.float16 if cfg.output.save_precision == "fp16" else torch.float32
    meta = build_metadata(cfg, info, path.stem)
    if cfg.output.format == "diffusers":
        meta = {"lora_studio.format": "diffusers (loads in diffusers only, not A1111/ComfyUI)",
                **{k: v for k, v in meta.items() if k.startswith("modelspec.")}}
        return save_lora(path, to_diffusers(lora, dtype), meta)
    n_te = 2 if family.is_sdxl else 1
    prefixes = dict(zip(part_names(n_te), text_encoder_prefixes(n_te)))
    parts = {("lora_unet_" if name == "unet" else prefixes[name]): state for name, state in lora.items()}
    return save_lora(path, to_kohya(parts, cfg.network.alpha, dtype), meta)
