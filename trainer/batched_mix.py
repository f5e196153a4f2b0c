"""Per-picture LoRA mixes in one batched call: every picture of a batch has its own weights per LoRA.

Merged weights are one W' per module, the same for the whole batch; here the base weights stay as they are and
each adapted module gets a forward hook adding, for sample n,
    Σ_l w[n, l] · scale_l · up_l @ down_l @ x_n          (low-rank entries: two thin matmuls per module)
    Σ_l w[n, l] · ΔW_l @ x_n                             (LoHa/LoKr and other full-delta entries)
All LoRAs' down matrices of a module are concatenated ([R = Σ r_l, in]), so a module costs two matmuls whatever the
number of LoRAs; the per-sample weights scale the R rank columns in between ([N, R]). The UNet sees 2·B samples
under classifier-free guidance (the pipeline concatenates [uncond; cond]): the B weight rows are tiled to follow
each picture through both halves, as the single-picture path applies its LoRAs to both. Text-encoder weights are
per picture too, so prompts are encoded per mix, in one batched call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .conditioning import encode_text, text_parts
from .errors import StudioError


@dataclass
class Picture:
    """One picture of a batch: its prompt (may hold <lora:name:w> tags), its own LoRA mix and seed."""
    prompt: str
    loras: list = field(default_factory=list)  # generate.LoraSpec
    negative_prompt: str = ""
    seed: int = 0


class _Branch:
    """The LoRA branches of one module, from any number of LoRAs (index l in the batch's list of files)."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.low: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.full: list[tuple[int, torch.Tensor]] = []

    def finish(self) -> None:
        w = self.layer.weight
        if self.low:
            self.down = torch.cat([d for _, d, _, _ in self.low]).to(w.device, w.dtype)
            self.up = torch.cat([u for _, _, u, _ in self.low], dim=1).to(w.device, w.dtype)
            self.owner = torch.cat([torch.full((d.shape[0],), l) for l, d, _, _ in self.low]).to(w.device)
            self.rank_scale = torch.cat([torch.full((d.shape[0],), s) for _, d, _, s in self.low]).to(w.device, w.dtype)
            if isinstance(self.layer, torch.nn.Linear):  # transposed once: a step then runs two plain mm's
                self.down_t, self.up_t = self.down.t().contiguous(), self.up.t().contiguous()
        self.full = [(l, d.to(w.device, w.dtype).reshape(w.shape)) for l, d in self.full]

    def set_weights(self, w: torch.Tensor | None) -> None:
        """w: [B, L] per-picture weights of the L LoRAs, or None (branches off)."""
        self.w, self._tiled = w, {}

    def _scales(self, n: int):
        """(w [n, L], rank-column scales [n, R] or None, any low-rank weight non-zero) for a batch of n samples:
        the B rows tiled, as the pipeline concatenates [uncond; cond] under guidance (tile, not interleave)."""
        if n not in self._tiled:
            b = self.w.shape[0]
            assert n % b == 0, f"a batch of {n} samples for {b} pictures"
            w = self.w.repeat(n // b, 1).to(self.layer.weight.device, self.layer.weight.dtype)
            s = w[:, self.owner] * self.rank_scale if self.low else None
            self._tiled[n] = (w, s, s is not None and bool(s.any()))
        return self._tiled[n]

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, is_up: bool = False) -> torch.Tensor:
        if isinstance(self.layer, torch.nn.Conv2d):
            if is_up:
                return F.conv2d(x, weight)
            c = self.layer
            return F.conv2d(x, weight, None, c.stride, c.padding, c.dilation, c.groups)
        return F.linear(x, weight.flatten(1) if weight.dim() > 2 else weight)

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + this module's branches for input x (in place when no gradients are recorded: no copy of out)."""
        w, s, low_active = self._scales(x.shape[0])
        inplace = not torch.is_grad_enabled() and out.is_contiguous()
        conv = isinstance(self.layer, torch.nn.Conv2d)
        if low_active and not conv and inplace:  # the common case in fewer ops (F.linear on 3-D input makes ~6)
            h = torch.mm(x.reshape(-1, x.shape[-1]), self.down_t)  # [N·T, R]
            h = h.view(s.shape[0], -1, s.shape[1]).mul_(s.unsqueeze(1))  # each sample's rank columns scaled
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, s.shape[1]), self.up_t)
        elif low_active:
            h = self._apply(x, self.down)
            h = h * (s.view(s.shape[0], -1, 1, 1) if conv else s.view((s.shape[0],) + (1,) * (h.dim() - 2) + (-1,)))
            h = self._apply(h, self.up, is_up=True)
            out = out.add_(h) if inplace else out + h
        for l, delta in self.full:
            if bool(w[:, l].any()):
                h = self._apply(x, delta) * w[:, l].view((-1,) + (1,) * (out.dim() - 1))
                out = out.add_(h) if inplace else out + h
        return out


class SampleMixes:
    """Forward hooks on every module a LoRA of the batch touches; set_weights(part, [B, L]) before each call."""

    def __init__(self, parts: dict[str, torch.nn.Module], files: list[list]):
        self.parts = parts
        self.branches: dict[tuple[str, str], _Branch] = {}
        modules = {part: dict(model.named_modules()) for part, model in parts.items()}
        for l, entries in enumerate(files):
            for e in entries:
                key = (e.part, e.module)
                if key not in self.branches:
                    self.branches[key] = _Branch(modules[e.part][e.module])
                branch = self.branches[key]
                if getattr(e, "up", None) is not None and branch_fits(branch.layer, e):
                    branch.low.append((l, e.down, e.up, float(e.scale)))
                else:
                    branch.full.append((l, e.delta()))
        for branch in self.branches.values():
            branch.finish()
            branch.set_weights(None)
        self._handles = []

    def set_weights(self, part: str, w: torch.Tensor | None) -> None:
        for (p, _), branch in self.branches.items():
            if p == part:
                branch.set_weights(w)

    def __enter__(self) -> "SampleMixes":
        for branch in self.branches.values():
            self._handles.append(branch.layer.register_forward_hook(self._hook(branch)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _hook(branch: _Branch):
        def hook(_module, args, out):
            return out if branch.w is None else branch.add(args[0], out)
        return hook


def branch_fits(layer: torch.nn.Module, entry) -> bool:
    """A low-rank pair the two-matmul branch computes: Linear, or a Conv2d (down with its kernel, up 1x1)."""
    if isinstance(layer, torch.nn.Linear):
        return True
    return isinstance(layer, torch.nn.Conv2d) and layer.groups == 1 and entry.up.dim() == 4 \
        and tuple(entry.up.shape[2:]) == (1, 1) and entry.down.dim() == 4


def weight_matrix(pictures: list[Picture], paths: list[str], te: bool) -> torch.Tensor:
    """[B, L]: each picture's UNet (te=False) or text-encoder weight for each file (0 where not in its mix)."""
    index = {p: i for i, p in enumerate(paths)}
    out = torch.zeros(len(pictures), len(paths))
    for n, picture in enumerate(pictures):
        for spec in picture.loras:
            unet_w, te_w = spec.weights()
            out[n, index[spec.path]] += te_w if te else unet_w
    return out


def encode_mixed(mixes: SampleMixes, text_encoders: list, tokenizers: list, pictures: list[Picture],
                 te_weights: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """generate.encode_prompt for a batch, each prompt through the text encoders with its own picture's mix."""
    encoder_parts = [part for part in mixes.parts if part.startswith("text_encoder")]
    for part in encoder_parts:
        mixes.set_weights(part, te_weights)
    try:
        emb, pooled = encode_text(text_encoders, tokenizers, [p.prompt for p in pictures], clip_skip)
        neg, neg_pooled = encode_text(text_encoders, tokenizers, [p.negative_prompt for p in pictures], clip_skip)
    finally:
        for part in encoder_parts:
            mixes.set_weights(part, None)
    out = {"prompt_embeds": emb, "negative_prompt_embeds": neg}
    if pooled is not None:
        empty = torch.tensor([not p.negative_prompt for p in pictures], device=neg.device)
        # SDXL's base config: zeros for an empty negative prompt (as encode_prompt, per picture)
        neg = torch.where(empty.view(-1, 1, 1), torch.zeros_like(neg), neg)
        neg_pooled = torch.where(empty.view(-1, 1), torch.zeros_like(neg_pooled), neg_pooled)
        out.update(negative_prompt_embeds=neg, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
    return out


@torch.no_grad()
def render_latents(pipe, pictures: list[Picture], files: dict[str, list], steps: int, cfg: float, width: int,
                   height: int, clip_skip: int = 1, on_step_end=None) -> torch.Tensor:
    """The pictures' final latents [B, C, h, w] in one pipeline call. `files` maps each LoraSpec.path of the
    pictures' mixes to its module entries. The pipeline's own LoRAs must be off (base weights)."""
    paths = list(files)
    encoders, tokenizers = text_parts(pipe)
    with SampleMixes(pipe_parts(pipe), [files[p] for p in paths]) as mixes:
        embeds = encode_mixed(mixes, encoders, tokenizers, pictures, weight_matrix(pictures, paths, te=True), clip_skip)
        mixes.set_weights("unet", weight_matrix(pictures, paths, te=False))
        kwargs = {k: v.to(pipe.unet.device, pipe.unet.dtype) for k, v in embeds.items()}
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in pictures]
        return pipe(**kwargs, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                    generator=generators, output_type="latent", callback_on_step_end=on_step_end).images


def pipe_parts(pipe) -> dict[str, torch.nn.Module]:
    """The models a LoRA can patch, by the names LoRA files use (Generator.parts for a bare pipeline)."""
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


def render_pictures(gen, pictures: list[Picture], steps: int = 20, cfg: float = 7.0, width: int = 0, height: int = 0,
                    sampler: str = "euler", clip_skip: int = 1, max_batch: int = 8,
                    progress=None) -> list[Image.Image]:
    """Generator.generate for many pictures, up to max_batch per pipeline call: picture i equals the picture
    gen.generate renders alone with the same prompt, mix and seed (to float tolerance). progress: generate's,
    counted in picture-steps (a call of k pictures reports k per step; all calls reach steps × pictures)."""
    from .generate import SAMPLERS, LoraSpec, _step_callback, decode_latents, with_tagged

    if sampler not in SAMPLERS:
        raise StudioError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if max_batch < 1:
        raise StudioError(f"max_batch is {max_batch}: use 1 or more pictures per call")
    resolved = []
    for p in pictures:
        prompt, specs = with_tagged(p.prompt, p.loras, gen.resolve)
        specs = [LoraSpec(str(Path(s.path).resolve()), *s.weights()) for s in specs]
        resolved.append(Picture(prompt, specs, p.negative_prompt, p.seed))
    # every file read and checked (family, NaN, fit) as the single-picture path does, before any work
    files = {s.path: gen.lora_deltas(Path(s.path))[1] for p in resolved for s in p.loras}
    gen.set_loras([])  # the base weights restored exactly: the LoRAs come in as per-sample branches
    cls, extra = SAMPLERS[sampler]
    gen.pipe.scheduler = cls.from_config(gen.pipe.scheduler.config, **extra)
    size = gen.pipe.unet.config.sample_size * gen.pipe.vae_scale_factor
    images = []
    for start in range(0, len(resolved), max_batch):
        chunk = resolved[start:start + max_batch]
        used = {s.path: files[s.path] for p in chunk for s in p.loras}
        k = len(chunk)
        scaled = None if progress is None else (lambda step, total, lat, k=k: progress(step * k, total * k, lat))
        latents = render_latents(gen.pipe, chunk, used, steps, cfg, width or size, height or size, clip_skip,
                                 _step_callback(scaled, steps))
        images += [decode_latents(gen.pipe, latents[i:i + 1]) for i in range(len(chunk))]
    return images
