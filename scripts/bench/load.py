"""Peak memory of loading an fp32 base model in bf16 (or fp16): our loader against diffusers' from_pretrained.

    .venv/bin/python scripts/bench/load.py --model-dir /tmp/sd15-random   # a diffusers folder stored in fp32
    .venv/bin/python scripts/bench/load.py                                # builds a random SD 1.5 UNet folder

Each way runs in its own subprocess, so its peak RSS (os.wait4's ru_maxrss) is its own; the two run one after the
other in one invocation, and the ratio is what counts:
  diffusers  UNet2DConditionModel / AutoencoderKL .from_pretrained(torch_dtype=...), as our loader did before:
             memory-maps the fp32 file and casts; every page it reads stays resident until the map is dropped
  ours       trainer.models.load_base_model(dtype=...): reads tensor by tensor and casts as it goes
             (trainer/weights.py)
The text encoder loads the same way in both (from_pretrained, then cast).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.config import PROJECT_ROOT as ROOT

SD1_CONFIGS = ROOT / "trainer" / "model_configs" / "sd1"

CHILD = r"""
import json, sys, torch
kind, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if kind == "diffusers":  # what trainer/models.py did before trainer/weights.py
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    kw = dict(local_files_only=True)
    parts = [UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **kw),
             AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw),
             CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw).to(dtype)]
else:
    from trainer.models import load_base_model
    base = load_base_model(folder, dtype=dtype)
    parts = [base.unet, base.vae, *base.text_encoders]
print(json.dumps({"params": sum(p.numel() for m in parts for p in m.parameters()),
                  "dtype": str(next(parts[0].parameters()).dtype)}))
"""


def measure(kind: str, folder: Path, dtype: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(folder), dtype],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gb": usage.ru_maxrss / 2**20}


def build(folder: Path) -> None:
    """SD 1.5's UNet, VAE and CLIP-L with seeded random weights, saved in fp32 (≈4 GB)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        cls.from_config(cls.load_config(SD1_CONFIGS, subfolder=sub)).save_pretrained(folder / sub)
    CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder")).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="", help="an SD 1.x diffusers folder stored in fp32 (else one is built)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "sd15-unet-vae"
        if not args.model_dir:
            print(f"building a random SD 1.5 UNet + VAE in {folder} …", flush=True)
            build(folder)
        rows = {kind: measure(kind, folder, args.dtype) for kind in ("diffusers", "ours")}
    for kind, row in rows.items():
        print(f"{kind:10s} peak RSS {row['peak_rss_gb']:.2f} GB  ({row['params'] / 1e6:.0f} M parameters, "
              f"{row['dtype']})")
    print(f"ours / diffusers peak RSS: {rows['ours']['peak_rss_gb'] / rows['diffusers']['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
