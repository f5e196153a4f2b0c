"""Write a diffusers pipeline as ONE file in the original layout that A1111 / ComfyUI / Civitai checkpoints use.

Test helper: it produces the single files that trainer.models must read, independently of the code that reads
them (diffusers' single_file_utils converts original → diffusers; this goes the other way, from the layout facts).

Original (LDM / SGM) layout, by part:
- UNet `model.diffusion_model.`: a flat list of blocks instead of down/up blocks with resnets and attentions.
  input_blocks.0.0 = conv_in; down block b, layer j (of n = layers_per_block) is input_blocks.{1 + b(n+1) + j}
  with .0 the resnet and .1 the transformer; its downsampler is input_blocks.{(b+1)(n+1)}.0.op.
  middle_block.0/1/2 = resnet, transformer, resnet. Up block b, layer j (of n+1) is output_blocks.{b(n+1) + j};
  its upsampler is the last layer's .1.conv (.2.conv when that layer also has a transformer).
  Resnet parts: in_layers.0/2 (norm1, conv1), emb_layers.1 (time_emb_proj), out_layers.0/3 (norm2, conv2),
  skip_connection (conv_shortcut). time_embed.0/2, label_emb.0.0/0.2 (SDXL add_embedding), out.0/2.
  Transformer internals keep the diffusers names.
- VAE `first_stage_model.`: encoder.down.{i}.block.{j}, .downsample.conv; decoder.up is numbered from the
  lowest resolution, so diffusers' decoder up_blocks.{i} is up.{L-1-i}; mid.block_1/attn_1/block_2;
  norm_out; nin_shortcut; attention q/k/v/proj_out/norm are 1×1 convs ([c, c, 1, 1]).
- OpenAI CLIP (SD 1.x, SDXL's first encoder): the transformers module tree under
  `cond_stage_model.transformer.text_model.` / `conditioner.embedders.0.transformer.text_model.`.
- OpenCLIP (SD 2.x `cond_stage_model.model.`, SDXL's second encoder `conditioner.embedders.1.model.`):
  token_embedding, positional_embedding (a bare tensor), transformer.resblocks.{i}.{ln_1, attn.in_proj_weight
  (q, k, v stacked), attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final,
  text_projection ([hidden, proj], the transpose of a Linear weight), logit_scale.
  SD 2.x checkpoints hold all 24 OpenCLIP-H layers although SD 2.x conditions on the 23rd: the extra layer is
  written here too (random) so that the loader is shown to skip it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET = "model.diffusion_model."
VAE = "first_stage_model."
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    part, _, param = rest.partition(".")
    return f"{RESNET_NAMES[part]}.{param}"


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    n = unet.config.layers_per_block
    up_has_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        module = ".".join(parts[:-1])
        if module in UNET_TOP:
            new = f"{UNET_TOP[module]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.weight
                new = f"input_blocks.{(b + 1) * (n + 1)}.0.op.{parts[-1]}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                block = f"input_blocks.{1 + b * (n + 1) + j}"
                new = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                new = f"output_blocks.{b * (n + 1) + n}.{2 if up_has_attn[b] else 1}.conv.{parts[-1]}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                block = f"output_blocks.{b * (n + 1) + j}"
                new = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        else:
            raise KeyError(f"no original name known for UNet key {key}")
        out[UNET + new] = value
    return out


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for ours, theirs in VAE_ATTN.items():
                new = new.replace(f"attn_1.{ours}.", f"attn_1.{theirs}.")
            if value.ndim == 2:  # the original attention projections are 1×1 convolutions
                value = value[:, :, None, None]
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            sub = "downsample" if parts[3] == "downsamplers" else f"block.{parts[4]}"
            new = ".".join([parts[0], "down", i, sub, *parts[5:]])
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            sub = "upsample" if parts[3] == "upsamplers" else f"block.{parts[4]}"
            new = ".".join([parts[0], "up", str(i), sub, *parts[5:]])
        out[VAE + new] = value
    return out


def _strip_text_model(key: str) -> str:
    # transformers 5 dropped the `text_model.` level from CLIPTextModel; CLIPTextModelWithProjection keeps it.
    return key.removeprefix("text_model.")


def clip_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{prefix}text_model.{_strip_text_model(k)}": v for k, v in text_encoder.state_dict().items()}
    # Most real SD 1.x files carry this buffer (older transformers saved it); a loader must tolerate it.
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return out


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_original(text_encoder, prefix: str, extra_layer: bool = False,
                          projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    sd = {_strip_text_model(k): v for k, v in text_encoder.state_dict().items()}
    out = {f"{prefix}token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           f"{prefix}positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           f"{prefix}ln_final.weight": sd.pop("final_layer_norm.weight"),
           f"{prefix}ln_final.bias": sd.pop("final_layer_norm.bias"),
           f"{prefix}logit_scale": torch.tensor(4.6052)}
    if "text_projection.weight" in sd:  # Linear [proj, hidden] → OpenCLIP matrix [hidden, proj]
        out[f"{prefix}text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    elif projection is not None:
        out[f"{prefix}text_projection"] = projection
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for ours, theirs in OPENCLIP_LAYER.items():
                out[f"{dst}{theirs}.{kind}"] = sd.pop(f"{src}{ours}.{kind}")
    assert not sd, f"unconverted text-encoder keys: {sorted(sd)}"
    if extra_layer:  # SD 2.x: OpenCLIP-H's last layer, present in the file, unused by the model
        g = torch.Generator().manual_seed(0)
        template = {k.removeprefix(f"{prefix}transformer.resblocks.0."): v for k, v in out.items()
                    if k.startswith(f"{prefix}transformer.resblocks.0.")}
        for name, v in template.items():
            out[f"{prefix}transformer.resblocks.{layers}.{name}"] = torch.randn(v.shape, generator=g)
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusionXLPipeline."""
    out = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP-L + OpenCLIP-G
        out.update(clip_to_original(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD 2.x: OpenCLIP-H
        hidden = pipe.text_encoder.config.hidden_size
        g = torch.Generator().manual_seed(1)
        out.update(open_clip_to_original(pipe.text_encoder, "cond_stage_model.model.", extra_layer=True,
                                         projection=torch.randn(hidden, hidden, generator=g)))
    else:  # SD 1.x: OpenAI CLIP-L
        out.update(clip_to_original(pipe.text_encoder, "cond_stage_model.transformer."))
    return {k: v.contiguous() for k, v in out.items()}


def write_original(pipe, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save `pipe` as one .safetensors file in the original layout."""
    save_file(pipeline_to_original(pipe), str(path), metadata=metadata)
    return Path(path)
