"""The reference LoRA training loop for scripts/bench/training.py: plain diffusers + PEFT, written the way diffusers'
examples/text_to_image/train_text_to_image_lora.py does it, so its speed is what a user of that script sees.

What it keeps from that script, on purpose (it is the baseline, not a second trainer):
- all three models are loaded in fp32 and cast to the mixed-precision dtype (`weight_dtype`); the LoRA is added
  after the cast (PEFT then creates it in the base layer's dtype) and is upcast to fp32 only under fp16;
- LoRA r = lora_alpha = rank, gaussian init, on to_q / to_k / to_v / to_out.0 (128 modules in SD 1.x; our trainer
  targets kohya's 192: these plus proj_in / proj_out / ff.net.0.proj / ff.net.2);
- every step runs the VAE encoder (a latent *sample*) and the frozen text encoder, then the UNet under
  accelerate's autocast (accelerator.prepare wraps its forward), MSE loss, backward, clip_grad_norm_, AdamW,
  constant LR; the loss is gathered and read with .item() as the script logs it;
- with spec["te"] (variant ref-fp32-te) the text encoder's LoRA trains too, the way diffusers'
  examples/dreambooth/train_dreambooth_lora.py --train_text_encoder does it: r = alpha = rank, gaussian, on
  q/k/v/out_proj (48 modules in CLIP-L; ours adds fc1/fc2: kohya's 72), its parameters in the same AdamW, the
  encoder in train mode, prepared by accelerate, run with grad every step.
The image pipeline is the script's (resize, center crop, to [-1, 1]) done with PIL and numpy: torchvision is not
installed here, and at batch 1 it costs milliseconds either way.

Run by scripts/bench/training.py in a subprocess of its own; `run(spec)` returns per-step wall and CPU times.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _pixels(path: Path, resolution: int) -> torch.Tensor:
    """transforms.Resize(res) + CenterCrop(res) + ToTensor() + Normalize([0.5], [0.5]) → [3, res, res]."""
    img = Image.open(path).convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def run(spec: dict, monitor) -> dict:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    model, data, resolution = Path(spec["model"]), Path(spec["data"]), spec["resolution"]
    mixed_precision = spec["precision"]  # "no" | "bf16", the script's --mixed_precision
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(spec["seed"])
    random.seed(spec["seed"])

    kw = dict(local_files_only=True)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    unet_lora_config = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian",
                                  target_modules=TARGET_MODULES)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    train_te = spec.get("te", False)
    if train_te:
        text_encoder.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian",
                                            target_modules=TEXT_TARGET_MODULES))
    if mixed_precision == "fp16":
        cast_training_params([unet, text_encoder] if train_te else unet, dtype=torch.float32)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    if train_te:
        lora_layers += [p for p in text_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    # The dataset: every image with its caption, tokenized like tokenize_captions() does.
    examples = []
    for image in sorted(data.glob("*.png")):
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        ids = tokenizer([caption], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids[0]
        examples.append({"pixel_values": _pixels(image, resolution), "input_ids": ids})

    def collate_fn(batch):
        pixel_values = torch.stack([e["pixel_values"] for e in batch]).to(memory_format=torch.contiguous_format)
        return {"pixel_values": pixel_values.float(), "input_ids": torch.stack([e["input_ids"] for e in batch])}

    total = spec["warmup"] + spec["steps"]
    train_dataloader = torch.utils.data.DataLoader(examples, shuffle=True, collate_fn=collate_fn, batch_size=1)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    if train_te:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                              lr_scheduler)

    steps, global_step = [], 0
    monitor.mark("steps")
    unet.train()
    if train_te:
        text_encoder.train()
    while global_step < total:
        for batch in train_dataloader:
            t0, c0 = time.time(), _cpu()
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise  # epsilon prediction
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(1)).mean()
                train_loss = avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            global_step += 1
            steps.append({"wall": time.time() - t0, "cpu": _cpu() - c0, "loss": train_loss})
            if global_step >= total:
                break
    monitor.mark("end")
    n_lora = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    n_lora += sum(1 for n, _ in text_encoder.named_modules() if n.endswith(".lora_A")) if train_te else 0
    return {"steps": steps, "lora_modules": n_lora, "lora_dtype": str(lora_layers[0].dtype)}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system
