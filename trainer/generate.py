"""Generation: one cached base pipeline, LoRAs of any format (lora_formats.py) stacked with separate UNet /
text-encoder weights.

Changing the LoRA mix never reloads the base model. The mix is merged into the weights, W' = W0 + Σ w_i · ΔW_i
(kohya: ΔW = alpha / r · up @ down), as A1111 and ComfyUI compute it, so a denoising step costs what it costs
without LoRAs; lora_mix.py keeps W0 to restore the base exactly. Files are read once per version.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from PIL import Image, ImageDraw

from .conditioning import encode_text, from_unet_latents, text_parts
from .errors import StudioError
from .lora_file import LoraFileError
from .lora_formats import ModuleDelta, module_deltas, read_lora
from .lora_mix import MergedMix, MixItem
from .memory import keep_freed_memory

SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++_2m": (DPMSolverMultistepScheduler, {}),
    "dpm++_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+0-9.eE]+))?(?::([-+0-9.eE]+))?>")


class LoraFamilyError(StudioError):
    """A LoRA trained for another model family than the loaded base model."""


class GenerationCancelled(Exception):
    """The progress callback asked to stop (the user pressed Cancel); no picture is made."""


# progress(step, total, latents) after each denoising step, latents in the UNet's space [B, C, h, w];
# returning True cancels the generation (GenerationCancelled).
Progress = Callable[[int, int, torch.Tensor], "bool | None"]


def _step_callback(progress: Progress | None, steps: int):
    """diffusers' callback_on_step_end, calling `progress` (None: no callback at all)."""
    if progress is None:
        return None

    def on_step_end(pipe, index, timestep, kwargs):
        if progress(index + 1, steps, kwargs["latents"]):
            raise GenerationCancelled(f"cancelled at step {index + 1} of {steps}")
        return kwargs
    return on_step_end


@dataclass
class LoraSpec:
    path: str
    unet_weight: float = 1.0
    te_weight: float | None = None  # None: the same as unet_weight

    def weights(self) -> tuple[float, float]:
        return self.unet_weight, self.unet_weight if self.te_weight is None else self.te_weight


class DoubledLoraError(StudioError):
    """A LoRA both in a <lora:…> tag and given apart from the prompt; `name` is the tag's."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def with_tagged(prompt: str, loras, resolve) -> tuple[str, list["LoraSpec"]]:
    """(the prompt without its <lora:…> tags, `loras` + the tagged LoRAs); `resolve`: a tag's name → its file.
    A LoRA both in `loras` (a picker, --lora, a grid axis) and in a tag is refused: the two weights would add up
    (a grid's weight axis 0…1 would run 0.8…1.8 under <lora:x:0.8>), and nothing on screen would say so."""
    prompt, tagged = parse_prompt_loras(prompt)
    given = {str(Path(s.path).resolve()) for s in loras}
    specs = list(loras)
    for name, unet, te in tagged:
        path = resolve(name)
        if str(Path(path).resolve()) in given:
            raise DoubledLoraError(f"the LoRA '{name}' is both in the prompt (<lora:{name}:…>) and given apart from "
                                   f"it ({Path(path).name}): its two weights would add up; take the tag out of the "
                                   "prompt, or the LoRA out of the mix", name)
        specs.append(LoraSpec(str(path), unet, te))
    return prompt, specs


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """A1111's `<lora:name:weight>` / `<lora:name:te_weight:unet_weight>` → (clean prompt, [(name, unet, te)])."""
    found = []
    for name, a, b in LORA_TAG.findall(prompt):
        te = float(a) if a else 1.0
        unet = float(b) if b else te
        found.append((name.strip(), unet, te))
    return re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(" ,"), found


def make_pipeline(unet, vae, text_encoders: list, tokenizers: list, noise_scheduler, sampler: str = "euler"):
    if sampler not in SAMPLERS:
        raise StudioError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[sampler]
    scheduler = cls.from_config(noise_scheduler.config, **extra)
    if len(text_encoders) == 2:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def encode_prompt(text_encoders: list, tokenizers: list, prompt: str, negative_prompt: str = "",
                  clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """The pipeline's embedding arguments for one prompt; our own text encoding (shared with training), so
    clip_skip works on every family, and so a trainer can encode its sample prompts before freeing the encoders."""
    emb, pooled = encode_text(text_encoders, tokenizers, [prompt], clip_skip)
    neg, neg_pooled = encode_text(text_encoders, tokenizers, [negative_prompt], clip_skip)
    if pooled is not None and not negative_prompt:  # SDXL's base config: zeros for an empty negative prompt
        neg, neg_pooled = torch.zeros_like(neg), torch.zeros_like(neg_pooled)
    out = {"prompt_embeds": emb, "negative_prompt_embeds": neg}
    if pooled is not None:
        out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
    return out


@torch.no_grad()
def render_embeds(pipe, embeds: dict[str, torch.Tensor], seed: int = 0, steps: int = 20, cfg: float = 7.0,
                  width: int = 512, height: int = 512, progress: Progress | None = None) -> Image.Image:
    dtype = pipe.unet.dtype
    kwargs = {k: v.to(pipe.unet.device, dtype) for k, v in embeds.items()}
    latents = pipe(**kwargs, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                   callback_on_step_end=_step_callback(progress, steps)).images
    return decode_latents(pipe, latents)


@torch.no_grad()
def redraw_embeds(pipe, embeds: list[dict[str, torch.Tensor]], latents: list[torch.Tensor], seeds: list[int],
                  strength: float, steps: int, cfg: float) -> list[Image.Image]:
    """Each picture redrawn by the pipeline's model (img2img, SDEdit): its latents (the UNet's space, [1, C, h, w],
    as trainer/caches.encode_latents gives them) noised to `strength` of the schedule with its own seed, then
    `steps` Euler steps with its prompt's embeddings. Pictures of one size are drawn in one batch."""
    sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    cls = StableDiffusionXLImg2ImgPipeline if sdxl else StableDiffusionImg2ImgPipeline
    # Built from the pipeline's parts (shared, not copied); not cls.from_pipe, which casts them and warns each time.
    takes = inspect.signature(cls.__init__).parameters
    i2i = cls(**{k: v for k, v in pipe.components.items() if k in takes},
              **({"requires_safety_checker": False} if "requires_safety_checker" in takes else {}))
    i2i.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    i2i.set_progress_bar_config(disable=True)
    total = max(steps, math.ceil(steps / strength - 1e-9))  # the pipeline runs int(total × strength) of them
    out: dict[int, Image.Image] = {}
    sizes: dict[tuple, list[int]] = {}
    for i, lat in enumerate(latents):
        sizes.setdefault(tuple(lat.shape[-2:]), []).append(i)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    for group in sizes.values():
        batch = {k: torch.cat([embeds[i][k] for i in group]).to(device, dtype) for k in embeds[group[0]]}
        drawn = i2i(**batch, image=torch.cat([latents[i] for i in group]).to(device, dtype), strength=strength,
                    num_inference_steps=total, guidance_scale=cfg, output_type="latent",
                    generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in group]).images
        out.update({i: decode_latents(pipe, drawn[k:k + 1]) for k, i in enumerate(group)})
    return [out[i] for i in range(len(latents))]


def decode_latents(pipe, latents: torch.Tensor) -> Image.Image:
    """Latents → picture, in the VAE's own dtype with autocast off. The pipelines cast latents to the VAE only when
    the VAE is fp16: with an fp16 UNet and the fp32 VAE we keep (the SD VAEs overflow in fp16) they would pass fp16
    latents to it (a dtype error on CUDA), and under the trainer's autocast they would decode in fp16 anyway."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        image = vae.decode(from_unet_latents(vae, latents.to(vae.dtype))).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def render(pipe, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20, cfg: float = 7.0,
           width: int = 512, height: int = 512, clip_skip: int = 1, progress: Progress | None = None) -> Image.Image:
    """One image from a pipeline that has its text encoders."""
    embeds = encode_prompt(*text_parts(pipe), prompt, negative_prompt, clip_skip)
    return render_embeds(pipe, embeds, seed, steps, cfg, width, height, progress)


def grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h + 20), "white")
    draw = ImageDraw.Draw(out)
    for i, (img, label) in enumerate(zip(images, labels)):
        out.paste(img, (i * w, 20))
        draw.text((i * w + 4, 4), label, fill="black")
    return out


class Generator:
    """Keeps one base pipeline; a LoRA mix is merged into its weights (lora_mix.py), each file read once."""

    def __init__(self, lora_dirs: list[str | Path] = ()):
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.base_path: Path | None = None
        self.pipe = None
        self.family = None
        self.loads = 0  # base-model loads, for tests and the UI's status line
        self._files: dict[str, tuple] = {}
        self._mix: MergedMix | None = None

    def load(self, base_model: str | Path) -> None:
        from .models import load_base_model  # here, so that importing generate stays light

        path = Path(base_model).resolve()
        if self.pipe is not None and path == self.base_path:
            return
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        if device == "cpu":
            keep_freed_memory()  # every denoising step reuses the last one's blocks instead of faulting in new ones
        base = load_base_model(path, dtype=dtype)
        pipe = make_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, base.noise_scheduler)
        self.use_pipeline(pipe.to(device), base.family, path)
        self.loads += 1

    def use_pipeline(self, pipe, family, path: Path) -> None:
        """Generate with a pipeline made elsewhere (make_pipeline; benchmarks build one in memory); `path` names
        the base model in messages."""
        self.pipe, self.family, self.base_path = pipe, family, Path(path)
        self._files = {}  # resolved path → (file version, its ModuleDeltas on this base)
        self._mix = MergedMix(self.parts())

    def resolve(self, name: str) -> Path:
        """A `<lora:name:…>` name → a file in the LoRA folders."""
        for folder in self.lora_dirs:
            for candidate in (folder / f"{name}.safetensors", folder / name):
                if candidate.is_file():
                    return candidate
        where = ", ".join(str(d) for d in self.lora_dirs) or "(no LoRA folder configured)"
        raise LoraFileError(f"<lora:{name}:…> names no file; looked for {name}.safetensors in {where}")

    def parts(self) -> dict[str, torch.nn.Module]:
        """The pipeline's models a LoRA can patch, by the names LoRA files use."""
        parts = {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder}
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            parts["text_encoder_2"] = self.pipe.text_encoder_2
        return parts

    def lora_deltas(self, path: Path) -> tuple[tuple, tuple[ModuleDelta, ...]]:
        """A LoRA file's deltas on this base model, read once per file version; refused in one line if they
        do not fit (another family, another model size, a format we do not read, NaN weights)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if self._files.get(str(path), ((),))[0] != key:
            lora = read_lora(path)
            if any(not bool(torch.isfinite(t).all()) for e in lora.entries for t in e.tensors.values()):
                raise LoraFileError(f"{path.name} holds NaN or inf weights (its training diverged); "
                                    "export an earlier checkpoint of its run instead")
            if lora.family != "unknown" and lora.family != self.family.arch:
                raise LoraFamilyError(
                    f"{path.name} is a {lora.family} LoRA but the base model {self.base_path.name} is "
                    f"{self.family.name}: pick a {lora.family} base model, or a LoRA trained for {self.family.name}")
            self._files[str(path)] = (key, tuple(module_deltas(lora, self.parts(), self.base_path.name)))
        return self._files[str(path)]

    def set_loras(self, loras: list[LoraSpec]) -> int:
        """Merge this mix into the weights (every file is checked before any weight changes); returns the number
        of modules rewritten, 0 when the mix is the one already applied."""
        assert self.pipe is not None, "load() a base model first"
        items = []
        for spec in loras:
            key, deltas = self.lora_deltas(Path(spec.path).resolve())
            items.append(MixItem(key, deltas, *spec.weights()))
        return self._mix.apply(items)

    def generate(self, prompt: str, loras: list[LoraSpec] = (), negative_prompt: str = "", seed: int = 0,
                 steps: int = 20, cfg: float = 7.0, width: int = 0, height: int = 0, sampler: str = "euler",
                 clip_skip: int = 1, progress: Progress | None = None) -> Image.Image:
        prompt, specs = with_tagged(prompt, loras, self.resolve)
        self.set_loras(specs)
        cls, extra = SAMPLERS[sampler] if sampler in SAMPLERS else (None, None)
        if cls is None:
            raise StudioError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config, **extra)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return render(self.pipe, prompt, negative_prompt, seed, steps, cfg, width or size, height or size, clip_skip,
                      progress)

    def redraw(self, captions: list[str], latents: list[torch.Tensor], seeds: list[int], loras: list[LoraSpec] = (),
               strength: float = 0.6, steps: int = 6, cfg: float = 7.0, clip_skip: int = 1) -> list[Image.Image]:
        """redraw_embeds with this pipeline and LoRA mix: each latent redrawn with its caption."""
        self.set_loras(list(loras))
        embeds = [encode_prompt(*text_parts(self.pipe), c, "", clip_skip) for c in captions]
        return redraw_embeds(self.pipe, embeds, latents, seeds, strength, steps, cfg)

    def generate_batch(self, pictures: list, **kwargs) -> list[Image.Image]:
        """Pictures each with its own LoRA mix and seed, rendered together (trainer/batched_mix.py); each equals
        generate() with the same prompt, mix and seed. kwargs: generate's, and max_batch (pictures per call)."""
        from .batched_mix import render_pictures

        return render_pictures(self, pictures, **kwargs)

    def sweep(self, prompt: str, lora: LoraSpec, weights=(0.0, 0.25, 0.5, 0.75, 1.0), negative_prompt: str = "",
              seed: int = 0, **kwargs) -> tuple[Image.Image, list[Image.Image]]:
        """The same seed at several weights of one LoRA, side by side, in one batched call."""
        from .batched_mix import Picture

        pictures = [Picture(prompt, [LoraSpec(lora.path, w, w if lora.te_weight is None else lora.te_weight * w)],
                            negative_prompt, seed) for w in weights]
        images = self.generate_batch(pictures, **kwargs)
        return grid(images, [f"{w:g}" for w in weights]), images
