"""Train the built-in demo base model (models/demo) from nothing, on the synthetic shape world.

    .venv/bin/python scripts/train_demo_base.py                  # the committed model (≈ see README for time)
    .venv/bin/python scripts/train_demo_base.py --out /tmp/demo --unet-steps 200   # a quick smoke run

It is a tiny model of the SD 1.x kind, saved as a diffusers folder that StableDiffusionPipeline.from_pretrained
loads: the real SD 1.x UNet topology (CrossAttnDownBlock2D×3 + DownBlock2D, layers_per_block 2, so LoRA keys are
the real SD 1.x keys) with small widths, a small AutoencoderKL (64×64 pixels → 16×16×4 latents), a small
12-layer CLIPTextModel and the real CLIP tokenizer.

Recipe, in three stages, each deterministic given --seed:
1. The autoencoder learns to reconstruct world pictures and random clutter (a general codec for this world).
   Its scaling_factor is set to 1/std of its latents, as SD's 0.18215 is for SD's VAE.
2. The text encoder is NOT trained: it stays at its seeded random init (token embeddings scaled up, so that its
   output says which words were there more than where: see WORD_SCALE). A frozen encoder's outputs can be cached
   for every caption, which makes stage 3 several times cheaper on a CPU; random token embeddings already tell
   the few words of this world apart; and a word the base never saw (a LoRA's trigger) gets an embedding of its
   own, as a rare word does in a real CLIP. The UNet learns to read these features through cross-attention.
3. The UNet learns epsilon prediction on cached latents of plain base shapes, with the training schedule the
   LoRA trainer uses (DDPM, 1000 steps, scaled_linear 0.00085–0.012), half the timesteps drawn from the noisier
   half, min-SNR-5 weighting (faster convergence),
   10% empty captions (so classifier-free guidance works), offset noise 0.1 (so it controls the background
   colour rather than taking it from the starting noise) and an EMA of the weights (what is saved).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.config import PROJECT_ROOT as ROOT
from trainer.demo import world

TOKENIZER_DIR = ROOT / "trainer" / "tokenizer"
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
TEXT_DIM = 32  # text-encoder width = the UNet's cross_attention_dim; the 49408×32 token table is most of its 7 MB
# Token embeddings are scaled up from CLIP's init (std 0.02 → 0.5). At the plain init, 12 random layers bury the
# word under position and context: "white" and "black" in the same place came out with cosine similarity 0.99,
# and the UNet never learned the background words. Scaled, they are at 0.41, and one word in two places at 0.77.
WORD_SCALE = 25.0
LATENT = world.SIZE // 4  # 16: a 3-level autoencoder halves twice


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adapt_threads(fixed: int) -> None:
    """Every core while the machine is otherwise idle, one thread when others are busy.

    On a shared CPU, torch's intra-op threads wait on each other whenever one is descheduled: on the 2-core
    machine this was made on, a step took 4-10× longer with 2 threads than with 1 while others were working,
    and 1.7× less time with 2 threads while nothing else ran. fixed > 0 pins the count.
    """
    if fixed > 0:
        torch.set_num_threads(fixed)
        return
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()  # the 1-minute load counts our own busy threads
    torch.set_num_threads(cores if others < 0.5 else 1)


# ---- the four parts ------------------------------------------------------------------------------------------

def make_vae(widths=(16, 32, 32), groups: int = 4) -> AutoencoderKL:
    # No attention in the middle block: a convolutional codec is enough for flat shapes, and cheaper.
    # 4-8 channels per norm group: with 1-2 channels per group GroupNorm acts as instance norm, which erases each
    # picture's colour statistics (seen: wrong hues and blob artefacts that smuggle the statistics past the norm).
    # Widths: at 1000 steps a 32/64/64 codec reconstructed worse than this one (edge width 3.7 against 3.2, hues
    # 0.44 against 0.83 right), with or without 1 norm group; what the first model's codec lacked was training.
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                         norm_num_groups=groups, sample_size=world.SIZE, mid_block_add_attention=False)


def make_text_encoder() -> CLIPTextModel:
    # SD 1.x's CLIP-L has 12 layers and quick_gelu: same depth here, so text-encoder LoRA keys are the real ones.
    cfg = CLIPTextConfig(hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=12,
                         num_attention_heads=4, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(WORD_SCALE)
    return model


def make_unet() -> UNet2DConditionModel:
    # 8 norm groups (4-8 channels each, as SD's 32 groups over 320+ channels hold 10+): see make_vae.
    return UNet2DConditionModel(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64),
                                layers_per_block=2, cross_attention_dim=TEXT_DIM, attention_head_dim=4,
                                down_block_types=SD_DOWN, up_block_types=SD_UP, norm_num_groups=8)


def make_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def to_tensor(images) -> torch.Tensor:
    """PIL images → float [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---- stage 1: the autoencoder ----------------------------------------------------------------------------------

def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(steps: int, seed: int, threads: int, batch: int = 16, widths=(16, 32, 32),
              edge: float = 0.0, groups: int = 4) -> AutoencoderKL:
    rng = np.random.default_rng(seed)
    plain = [world.render(s) for s in world.scenes(3000, seed)]
    pool = to_tensor(plain + [world.clutter(rng) for _ in range(2000)])  # [5000, 3, 64, 64]
    torch.manual_seed(seed)
    vae = make_vae(widths, groups)
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-5): sampling noise only blurs here
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        if step % 25 == 0:
            adapt_threads(threads)
        x = pool[torch.randint(0, len(pool), (batch,), generator=gen)]
        if step % 2:  # flips: free extra variety for a codec (the world itself is left-right symmetric)
            x = x.flip(3)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        # L1 keeps edges crisp; the tiny KL term keeps latents near unit scale without blurring. The optional edge
        # term (L1 of the pixel-to-pixel differences) pays for every pixel an edge is smeared over; in a 1000-step
        # trial it slowed everything else down (edge width 4.3 against 3.6), so it is off by default.
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-7 * post.kl().mean()
        if edge:
            loss = loss + edge * sum(F.l1_loss(a, b) for a, b in zip(gradients(rec), gradients(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return vae


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ---- stage 3: the UNet -------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]  # [N, 77, TEXT_DIM], what the pipeline feeds the UNet


def train_unet(vae, text_encoder, tokenizer, steps: int, seed: int, n_images: int, threads: int, batch: int = 16,
               lr: float = 8e-4, snr_gamma: float = 5.0, drop: float = 0.1, offset: float = 0.1) -> UNet2DConditionModel:
    scenes = world.scenes(n_images, seed + 1)
    images = to_tensor([world.render(s) for s in scenes])
    means, stds = encode(vae, images)
    scale = vae.config.scaling_factor
    # Every (scene, wording) caption is encoded once: the text encoder is frozen.
    combos = sorted({(s.shape, s.colour, s.background) for s in scenes})
    prompts = [""] + [world.TEMPLATES[t].format(shape=a, colour=c, background=b)
                      for a, c, b in combos for t in range(len(world.TEMPLATES))]
    cond = encode_prompts(text_encoder, tokenizer, prompts)
    first = torch.tensor([1 + combos.index((s.shape, s.colour, s.background)) * len(world.TEMPLATES) for s in scenes])
    log(f"unet data: {n_images} latents {tuple(means.shape[1:])}, {len(prompts)} cached captions, scale {scale:.4f}")

    torch.manual_seed(seed)
    unet = make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = training_scheduler()
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-γ for epsilon prediction
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    t0, avg = time.time(), None
    for step in range(steps):
        if step % 25 == 0:
            adapt_threads(threads)
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        if step % 2:
            latents = latents.flip(3)  # every figure of the base world is left-right symmetric
        wording = torch.randint(0, len(world.TEMPLATES), (batch,), generator=gen)
        which = torch.where(torch.rand(batch, generator=gen) < drop, 0, first[idx] + wording)
        # Offset noise: a random shift of each channel's mean. Without it the model never learns to set the mean of
        # a 16×16 latent (the background colour, here) and copies it from the starting noise instead (seen).
        noise = torch.randn(latents.shape, generator=gen) + offset * torch.randn((batch, 4, 1, 1), generator=gen)
        # Half the timesteps from the noisier half: there the picture's layout and colours are decided, and a
        # small model learns that part slowest (the LoRA trainer samples uniformly; this is the base only).
        t = torch.randint(0, 1000, (batch,), generator=gen)
        t = torch.where(torch.rand(batch, generator=gen) < 0.5, 500 + t // 2, t)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, cond[which]).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up: early averages do not drag in the random init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"unet step {step}/{steps} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
    return ema


# ---- assemble, save, check ---------------------------------------------------------------------------------------

def inference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def check_grid(pipe, path: Path, seed: int = 0) -> None:
    """A grid of prompted pictures: rows are shapes, columns colour/background pairs, to eyeball prompt-following."""
    from PIL import Image
    cols = [("red", "white"), ("green", "black"), ("blue", "gray"), ("yellow", "black"), ("purple", "white"),
            ("orange", "gray")]
    grid = Image.new("RGB", (world.SIZE * len(cols), world.SIZE * len(world.BASE_SHAPES)))
    prompts = [f"a {c} {shape} on a {b} background" for shape in world.BASE_SHAPES for c, b in cols]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    ims = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens).images
    for i, im in enumerate(ims):
        grid.paste(im, ((i % len(cols)) * world.SIZE, (i // len(cols)) * world.SIZE))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "demo"), help="the diffusers folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=8000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=4000, help="0: stop after the autoencoder (to inspect it)")
    ap.add_argument("--images", type=int, default=12000, help="world pictures the UNet trains on")
    ap.add_argument("--threads", type=int, default=0, help="0: adapt to the machine's load (see adapt_threads)")
    ap.add_argument("--vae", default="", help="reuse the autoencoder of an earlier run (a diffusers folder)")
    ap.add_argument("--grid", default="", help="also write a PNG grid of prompted samples here, to check by eye")
    args = ap.parse_args(argv)
    adapt_threads(args.threads)
    out = Path(args.out)
    start = time.time()

    if args.vae:
        vae = AutoencoderKL.from_pretrained(Path(args.vae) / "vae", local_files_only=True).eval()
    else:
        vae = train_vae(args.vae_steps, args.seed, args.threads, args.vae_batch)
        lat, _ = encode(vae, to_tensor([world.render(s) for s in world.scenes(1000, args.seed + 2)]))
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        vae.save_pretrained(str(out / "vae"))  # now, so that a rerun of stage 3 alone can take it (--vae)
    log(f"vae ready, scaling_factor {vae.config.scaling_factor:.4f} ({time.time() - start:.0f}s)")
    if args.unet_steps == 0:
        return

    torch.manual_seed(args.seed)
    text_encoder = make_text_encoder().eval()
    tokenizer = make_tokenizer()
    unet = train_unet(vae, text_encoder, tokenizer, args.unet_steps, args.seed, args.images, args.threads)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "LICENSE"):  # the slow CLIPTokenizer's files, and their licence (MIT)
        shutil.copyfile(TOKENIZER_DIR / name, out / "tokenizer" / name)
    seconds = time.time() - start
    # What made these weights, beside them. Not README.md: models/demo/README.md is the model's hand-written card
    # (what it draws, measured), which a rerun into the committed folder must not overwrite.
    (out / "made_by.json").write_text(json.dumps(
        {"script": "scripts/train_demo_base.py", "arguments": vars(args), "minutes": round(seconds / 60, 1),
         "threads": torch.get_num_threads()}, indent=1) + "\n", encoding="utf-8")
    log(f"saved {out} after {seconds / 60:.1f} min")
    if args.grid:
        check_grid(pipe, Path(args.grid))
        log(f"check grid written to {args.grid}")


if __name__ == "__main__":
    main()
