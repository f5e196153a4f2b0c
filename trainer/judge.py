"""The training loop's evaluation of its checkpoints: draws the evaluation prompts and redraws the likeness
pictures with the run's own modules, measures them (trainer/evaluation.py), computes the validation loss
(trainer/validation.py) and writes the `evaluation` and `recommendation` events (trainer/recommend.py).

Built during set-up, before the caches free what it needs: the VAE's encoder (the feature network; kept while
evaluation is on, 0.14 GB for SD's in fp32), the likeness pictures' latents and, when the text encoders are frozen,
the embeddings of its prompts, of the likeness captions and of the validation captions. Runs on the main process
only, like samples.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .conditioning import encode_text, sdxl_time_ids
from .data import Dataset, Draw, load_dataset
from . import eval_metrics as em
from .evaluation import Evaluator, default_sample_prompts, evaluation_prompts, trigger_words  # noqa: F401 (loop)
from .events import read_events
from .atomic import atomic_path
from .caches import encode_latents
from .generate import decode_latents, encode_prompt, make_pipeline, redraw_embeds
from .recommend import recommend
from .validation import fixed_noise, validation_loss


def split_validation(ds, share: float) -> list:
    """Every n-th image (n = 1/share) leaves the training set for the validation loss; returns those records."""
    if share <= 0 or len(ds.images) < 2:
        return []
    every = max(2, round(1 / share))
    held = [r for i, r in enumerate(ds.images) if i % every == every - 1 and not r.is_reg]
    ds.images = [r for r in ds.images if r not in held]
    return held


def make_judge(cfg, ds, base, held_out: list, sample_prompts: list[str], accelerator, started: float):
    """The run's Judge on the main process when evaluation.at_checkpoints is "auto", else None."""
    if not accelerator.is_main_process or cfg.evaluation.at_checkpoints != "auto":
        return None
    return Judge(cfg, ds, base, held_out, sample_prompts, accelerator, started)


def begin(run, sample: Callable[[], list]) -> None:
    """Before the first step: the base model's samples at step 0 (a fresh LoRA changes nothing), and the judge's
    base pictures (adapters off, so also right after a resume)."""
    if run.main and run.cfg.sample.every_n_steps and run.pos.step == 0:
        sample()
    if run.judge is not None:
        run.judge.start(run.parts, run.pos.step, run.resumed_from is not None, run.cfg.run_path())


def measure(run, lora_file: Path, events) -> None:
    """A checkpoint's `evaluation` and `recommendation` events, when the run has a judge."""
    if run.judge is not None:
        run.judge.checkpoint(run.parts, run.pos.step, lora_file, events)


class Judge:
    def __init__(self, cfg, ds, base, held_out: list, sample_prompts: list[str], accelerator, started: float):
        self.cfg, self.base, self.accelerator, self.started = cfg, base, accelerator, started
        self.device = accelerator.device
        captions = [r.caption for r in ds.images]
        prompts = evaluation_prompts(sample_prompts, cfg.evaluation.leak_prompts, captions,
                                     lambda i: training_picture(ds, i),
                                     trigger_words(captions, cfg.data.trigger_word), cfg.evaluation.likeness_images)
        self.encoder = base.vae.encoder  # kept here: the latent cache drops it from the VAE
        self.evaluator = Evaluator(self.encoder, prompts, cfg.sample.seed)
        # The likeness pictures as latents, encoded now (the cache may free the VAE's encoder): what redraw() noises.
        self.likeness_latents = [encode_latents(base.vae, em.to_pixels([im]).to(self.device)).float().cpu()
                                 for im in prompts.likeness_images]
        self.validation_on = "held-out images" if held_out or cfg.evaluation.validation_dir else "training images"
        source = self._validation_set(ds, held_out)
        self.val_latents = [self._encode_latent(source, i) for i in range(len(source.images))]
        self.val_captions = [r.caption for r in source.images]
        self.val_noise = fixed_noise(self.val_latents)
        self.embeds: dict[str, dict] = {}
        self.val_text: list = []
        self.frozen_text = not cfg.network.train_text_encoder
        if self.frozen_text:  # the encoders may be freed after set-up: encode everything now
            self.embeds = {p: self._embed(p) for p in self.evaluator.all_prompts()[0] + prompts.likeness}
            self.val_text = [self._text(c) for c in self.val_captions]
        self.history: list[dict] = []
        self.seconds = 0.0  # evaluation time so far, for its share of the run

    def _validation_set(self, ds, held_out: list) -> Dataset:
        """The validation images as a Dataset (its decoding and bucket crops), at most validation_images."""
        count = self.cfg.evaluation.validation_images
        if self.cfg.evaluation.validation_dir:
            other = load_dataset(replace(self.cfg.data, dataset=self.cfg.evaluation.validation_dir, repeats=1),
                                 self.cfg.training.seed)
            return Dataset(other.images[:count], other.report, other.cfg, other.seed)
        return Dataset((held_out or ds.images)[:count], ds.report, ds.cfg, ds.seed)

    @torch.no_grad()
    def _encode_latent(self, source, index: int) -> torch.Tensor:
        pixels, _ = source.load_pixels(Draw(image=index, flip=False, caption="", crop_seed=0))
        return encode_latents(self.base.vae, pixels[None].to(self.device))[0].float().cpu()

    @torch.no_grad()
    def _embed(self, prompt: str) -> dict:
        with self.accelerator.autocast():
            return encode_prompt(self.base.text_encoders, self.base.tokenizers, prompt, self.cfg.sample.negative_prompt,
                                 self.cfg.model.clip_skip)

    @torch.no_grad()
    def _text(self, caption: str):
        with self.accelerator.autocast():
            emb, pooled = encode_text(self.base.text_encoders, self.base.tokenizers, [caption], self.cfg.model.clip_skip,
                                      self.device)
        return emb.cpu(), None if pooled is None else pooled.cpu()

    # ---- drawing and measuring -----------------------------------------------------------------------------------

    def _pipeline(self):
        base = self.base
        encoders = [None] * len(base.text_encoders) if self.frozen_text else base.text_encoders
        pipe = make_pipeline(base.unet, base.vae, encoders, base.tokenizers, base.noise_scheduler, "euler")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _embeds(self, prompts: list[str]) -> list[dict]:
        return [self.embeds[p] if self.frozen_text else self._embed(p) for p in prompts]

    @torch.no_grad()
    def render(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """All prompts in one batch (one generator per picture: the same pictures as one by one)."""
        cfg, pipe = self.cfg, self._pipeline()
        embeds = self._embeds(prompts)
        batch = {k: torch.cat([e[k] for e in embeds]).to(self.device, self.base.unet.dtype) for k in embeds[0]}
        size = (cfg.sample.width or cfg.data.resolution, cfg.sample.height or cfg.data.resolution)
        with self.accelerator.autocast():
            latents = pipe(**batch, num_inference_steps=cfg.evaluation.steps, guidance_scale=cfg.sample.cfg,
                           width=size[0], height=size[1], output_type="latent",
                           generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
        return [decode_latents(pipe, latents[i:i + 1]) for i in range(len(prompts))]

    @torch.no_grad()
    def redraw(self, seeds: list[int]) -> list[Image.Image]:
        """The likeness pictures redrawn by the model as it is now, each with its caption (eval_metrics.likeness):
        Euler steps from REDRAW_STRENGTH of the schedule (eval_metrics.redraw_steps)."""
        with self.accelerator.autocast():
            return redraw_embeds(self._pipeline(), self._embeds(self.evaluator.prompts.likeness),
                                 self.likeness_latents, seeds, em.REDRAW_STRENGTH,
                                 em.redraw_steps(self.cfg.evaluation.steps), self.cfg.sample.cfg)

    @torch.no_grad()
    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, images: list[int]) -> torch.Tensor:
        base, n = self.base, noisy.shape[0]
        texts = [self.val_text[i] if self.frozen_text else None for i in images]
        if not self.frozen_text:  # the text encoders train: encode each caption with them as they are now
            live = {i: self._text(self.val_captions[i]) for i in dict.fromkeys(images)}
            texts = [live[i] for i in images]
        dtype = base.unet.dtype
        emb = torch.cat([t[0] for t in texts]).to(self.device, dtype)
        added = None
        if base.family.is_sdxl:
            scale = 2 ** (len(base.vae.config.block_out_channels) - 1)  # latent → pixel size
            h, w = noisy.shape[-2] * scale, noisy.shape[-1] * scale
            time_ids = sdxl_time_ids([(w, h)] * n, [(0, 0)] * n, [(w, h)] * n)
            added = {"text_embeds": torch.cat([t[1] for t in texts]).to(self.device, dtype),
                     "time_ids": time_ids.to(self.device, dtype)}
        with self.accelerator.autocast():
            return base.unet(noisy.to(self.device, dtype), timesteps.to(self.device), emb,
                             added_cond_kwargs=added).sample

    def start(self, parts: dict, step: int, resumed: bool, events_dir: Path) -> list[Image.Image]:
        """The base model's pictures (adapters off: also right after a resume); earlier evaluations of a resumed
        run up to its step count towards the recommendation."""
        began = time.time()
        if resumed:
            self.history = [e for e in read_events(events_dir) if e.get("event") == "evaluation" and e["step"] <= step]
        with _eval_mode(parts), _adapters_off(parts):
            pictures = self.evaluator.set_base(self.render, self.redraw)
        self.seconds += time.time() - began
        return pictures

    def checkpoint(self, parts: dict, step: int, lora_path: Path, events) -> dict:
        """Measure the model as it is now; write `evaluation` and `recommendation` (share_of_training: the
        evaluation's seconds so far over the rest of the run's)."""
        began = time.time()
        with _eval_mode(parts):
            measured = self.evaluator.measure(self.render, self.redraw)
            loss = validation_loss(self._predict, self.val_latents, self.base.noise_scheduler, self.val_noise)
        self.seconds += time.time() - began
        pictures = []
        for i, picture in enumerate(self.evaluator.last_pictures):  # what was measured, beside the LoRA file
            path = lora_path.parent.parent / "evaluation" / f"step_{step:06d}_{i}.png"
            with atomic_path(path) as tmp:
                picture.save(tmp, format="PNG")
            pictures.append(str(path))
        record = events.emit("evaluation", step=step, lora=str(lora_path), pictures=pictures,
                             validation_loss=round(loss, 6),
                             validation_on=self.validation_on, **measured, seconds=round(time.time() - began, 2),
                             share_of_training=round(self.seconds / max(time.time() - self.started - self.seconds, 1e-9), 4))
        self.history = [e for e in self.history if e["step"] != step] + [record]
        pick = recommend(self.history)
        if pick is not None:
            chosen = next(e for e in self.history if e["step"] == pick["step"])
            events.emit("recommendation", step=pick["step"], lora=chosen.get("lora"), reason=pick["reason"])
        return record


def training_picture(ds, index: int) -> Image.Image:
    """A training image as the model sees it (bucket crop, no flip)."""
    pixels, _ = ds.load_pixels(Draw(image=index, flip=False, caption="", crop_seed=0))
    array = ((pixels.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(array, "RGB")


@contextmanager
def _eval_mode(parts: dict):
    for m in parts.values():
        m.eval()
    try:
        yield
    finally:
        for m in parts.values():
            m.train()


@contextmanager
def _adapters_off(parts: dict):
    for m in parts.values():
        m.disable_adapters()
    try:
        yield
    finally:
        for m in parts.values():
            m.enable_adapters()
