"""`python -m trainer train | generate | inspect | dataset | export | resize | merge | bake | extract` — the contract
the UI, users and tests share.

A small surface on purpose: the command line sets the few things people change per run; everything else
lives in presets and config files (an argparse flag for everything becomes a widget for everything).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, build_config, read_toml
from .errors import StudioError


def _train_overrides(args) -> dict:
    """Short-form flags → a sparse override layer, the same shape as a TOML file."""
    layer: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            layer.setdefault(section, {})[key] = value

    put("model", "base_model", args.base_model)
    put("data", "dataset", args.dataset)
    put("data", "resolution", args.resolution)
    put("data", "trigger_word", args.trigger_word)
    put("network", "rank", args.rank)
    put("network", "alpha", args.alpha)
    put("network", "train_text_encoder", args.train_text_encoder)
    put("optimizer", "learning_rate", args.lr)
    put("optimizer", "optimizer", args.optimizer)
    put("training", "steps", args.steps)
    put("training", "epochs", args.epochs)
    put("training", "batch_size", args.batch_size)
    put("training", "seed", args.seed)
    put("training", "mixed_precision", args.mixed_precision)
    if args.output:
        out = Path(args.output)
        if out.suffix != ".safetensors":
            raise ConfigError(f"--output {out}: the LoRA file must end in .safetensors")
        put("output", "name", out.stem)
        put("output", "lora_dir", str(out.parent))
    put("output", "run_dir", args.run_dir)
    return layer


def _train_config(args, config: str | None):
    layers = []
    if args.preset:
        layers.append({"preset": args.preset})
    if config:
        layers.append(read_toml(config))
    layers.append(_train_overrides(args))
    cfg = build_config(*layers)
    if not cfg.data.dataset:
        raise ConfigError(f"no dataset{' in ' + config if config else ''}: pass --dataset DIR or set [data] "
                          "dataset in the config")
    return cfg


def _outcome(cfg, out, prefix: str = "") -> None:
    from .checkpoint import latest_checkpoint

    if out is None and latest_checkpoint(cfg.run_path()) is None:
        print(f"{prefix}stopped before the first optimiser step: no checkpoint was made (start again to train)")
    elif out is None:
        print(f"{prefix}stopped; a checkpoint was saved — continue with the same command plus --resume")
    else:
        print(f"{prefix}saved {out}")


def cmd_train(args) -> int:
    from .loop import train

    configs = args.config or [None]
    if len(configs) > 1:
        return _train_together(args, configs)
    cfg = _train_config(args, configs[0])
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the first process reports
        return 0
    _outcome(cfg, out)
    return 0


def _train_together(args, configs: list[str]) -> int:
    """Several --config: one process, one base model (trainer/multi_run.py); one line per run, exit 2 when one
    failed with an error of the user's to fix (1: the disk), and a bug's traceback after the others finished."""
    import traceback

    from .errors import USER_ERRORS
    from .multi_run import train_many

    cfgs = [_train_config(args, c) for c in configs]
    code = 0
    for cfg, out in zip(cfgs, train_many(cfgs, resume=args.resume, overwrite=args.overwrite)):
        if not isinstance(out, BaseException):
            _outcome(cfg, out, f"{cfg.output.name}: ")
            continue
        print(f"{cfg.output.name}: error: {one_line(out)}", file=sys.stderr)
        if not isinstance(out, USER_ERRORS):
            traceback.print_exception(out)
        code = max(code, _exit_code(out))
    return code


def _exit_code(e: BaseException) -> int:
    """2: the user's to fix (trainer/errors.py); 1: the disk or the system refused, or a bug."""
    return 2 if isinstance(e, (StudioError, FileNotFoundError)) else 1


def _lora_arg(item: str):
    """FILE[:WEIGHT]; a path that itself holds ':' (C:\\…) without a weight stays whole."""
    from .generate import LoraSpec

    path, sep, weight = item.rpartition(":")
    try:
        return LoraSpec(path, float(weight)) if sep else LoraSpec(item)
    except ValueError:
        return LoraSpec(item)


def cmd_generate(args) -> int:
    from PIL import Image

    from .atomic import atomic_path
    from .generate import Generator
    from .models import default_base_model

    image_format = Image.registered_extensions().get(Path(args.out).suffix.lower())
    if image_format is None:
        raise ConfigError(f"--out {args.out}: not an image file name; end it in .png, .jpg or .webp")
    specs = [_lora_arg(item) for item in args.lora or []]
    gen = Generator(lora_dirs=[Path(s.path).parent for s in specs] + [Path("models/Lora")])
    gen.load(args.base_model or default_base_model())
    common = dict(steps=args.steps, cfg=args.cfg, width=args.width or 0, height=args.height or 0,
                  sampler=args.sampler)
    if args.grid:
        image = _grid(gen, args, specs, common)
    else:
        image = gen.generate(args.prompt, specs, negative_prompt=args.negative, seed=args.seed, **common)
    with atomic_path(args.out) as tmp:
        image.save(tmp, format=image_format)
    print(f"saved {args.out}")
    return 0


def _grid(gen, args, specs, common):
    """--grid X [--grid Y]: every picture of the grid in batched calls (trainer/xy_grid.py)."""
    from .batched_mix import Picture
    from .xy_grid import parse_axis, render_grid

    if len(args.grid) > 2:
        raise ConfigError(f"--grid was given {len(args.grid)} times: give one (columns) or two (columns, rows)")
    axes = [parse_axis(text, lambda ref: Path(ref) if Path(ref).is_file() else gen.resolve(ref), args.prompt)
            for text in args.grid]
    base = Picture(args.prompt, specs, args.negative, args.seed)
    image, images = render_grid(gen, base, axes[0], axes[1] if len(axes) > 1 else None, max_batch=args.max_batch,
                                **common)
    print(f"{len(images)} pictures in a {len(images) // len(axes[0].values)}×{len(axes[0].values)} grid")
    return image


def cmd_inspect(args) -> int:
    from .lora_file import inspect_lora

    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if info["non_finite"] else 0
    algorithm = info["algorithm"] + (" (tucker)" if info["tucker"] and info["algorithm"] != "tucker" else "")
    rank = info["rank"] if info["rank"] is not None else ", ".join(f"{r}: {n}" for r, n in info["ranks"].items()) or "none"
    alpha = info["alpha"] if info["alpha"] is not None else "none (scale 1)" if list(info["alphas"]) == ["None"] else \
        ", ".join(f"{a}: {n}" for a, n in info["alphas"].items())
    print(f"{info['path']}\n  format: {info['format']}  algorithm: {algorithm}\n  family: {info['family']}\n"
          f"  rank: {rank}  alpha: {alpha}  dtype: {info['dtype']}\n  modules: {info['modules']}  tensors: {info['tensors']}")
    if info["trigger_words"]:
        print(f"  trigger words: {', '.join(info['trigger_words'])}")
    if info.get("non_finite"):
        print(f"  NOT USABLE: {len(info['non_finite'])} tensors hold NaN or inf values, e.g. {info['non_finite'][0]} "
              "(the run diverged; export an earlier checkpoint)")
    for key, value in sorted(info["metadata"].items()):
        text = value if len(value) < 120 else value[:117] + "..."
        print(f"  {key}: {text}")
    return 1 if info.get("non_finite") else 0


def cmd_export(args) -> int:
    from .export_run import export_run

    print(f"saved {export_run(args.run_dir, args.out, args.step)}")
    return 0


def cmd_dataset(args) -> int:
    from .data import run_dataset_command

    return run_dataset_command(args.dir, caption_extension=args.caption_extension, resolution=args.resolution,
                               trigger_word=args.trigger_word or "")


def _report(result) -> int:
    print("\n".join(result.lines))
    return 0


def cmd_resize(args) -> int:
    from .tools import RankRule, parse_dynamic, resize

    rule = parse_dynamic(args.dynamic, args.rank) if args.dynamic else RankRule(args.rank)
    return _report(resize(args.file, args.out, rule, overwrite=args.overwrite))


def cmd_merge(args) -> int:
    from .tools import merge, parse_weighted

    return _report(merge([parse_weighted(f) for f in args.files], args.out, rank=args.rank, overwrite=args.overwrite))


def cmd_bake(args) -> int:
    from .tools import bake, parse_weighted

    return _report(bake(args.base_model, [parse_weighted(f) for f in args.lora], args.out, overwrite=args.overwrite))


def cmd_extract(args) -> int:
    import torch

    from .tools import extract

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.save_precision]
    return _report(extract(args.base_model, args.tuned, args.out, args.rank, overwrite=args.overwrite, dtype=dtype,
                           conv_rank=args.conv_rank))


def _tool_parsers(sub) -> None:
    r = sub.add_parser("resize", help="a LoRA at a smaller or per-module (dynamic) rank, by SVD")
    r.add_argument("file")
    r.add_argument("--rank", type=int, help="the new rank (with --dynamic: the largest allowed)")
    r.add_argument("--dynamic", help="sv_ratio:X | sv_fro:X | sv_cumulative:X, per module (kohya resize_lora.py)")
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.set_defaults(func=cmd_resize)

    m = sub.add_parser("merge", help="several LoRAs (any format we read) into one plain kohya LoRA; one file: convert")
    m.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    m.add_argument("--rank", type=int, help="SVD to this rank (default: exact, the ranks concatenated)")
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_merge)

    b = sub.add_parser("bake", help="a new base model with a LoRA mix merged into its weights")
    b.add_argument("--base-model", required=True, help="diffusers folder or .safetensors/.ckpt checkpoint")
    b.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeat to bake a mix")
    b.add_argument("--out", required=True, help="OUT.safetensors (same layout as a single-file base) or a folder")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.set_defaults(func=cmd_bake)

    e = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints of one family")
    e.add_argument("--base-model", required=True)
    e.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--conv-rank", type=int, help="also the UNet's resnet convolutions, at this rank (a LoCon)")
    e.add_argument("--save-precision", choices=("fp16", "fp32"), default="fp16")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_extract)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Studio training engine")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA")
    t.add_argument("--config", action="append",
                   help="a run config .toml (a top-level `preset = \"name\"` is applied first); given several "
                        "times, the runs train together on one loaded copy of their shared base model")
    t.add_argument("--preset", help="a preset name from presets/ (style, character, sdxl-style, low-memory, demo)")
    t.add_argument("--base-model", help="diffusers folder or .safetensors checkpoint (default: the demo model)")
    t.add_argument("--dataset", help="image folder, kohya N_name parent folder, or dataset .toml")
    t.add_argument("--output", help="the LoRA file to write, e.g. models/Lora/my-style.safetensors")
    t.add_argument("--run-dir", help="checkpoints, samples, events (default runs/<name>)")
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--rank", type=int)
    t.add_argument("--alpha", type=float)
    t.add_argument("--resolution", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--optimizer", help="adamw | adamw8bit | prodigy")
    t.add_argument("--mixed-precision", help="auto | no | fp16 | bf16")
    t.add_argument("--trigger-word")
    t.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds another run's checkpoints (they are deleted)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate an image, optionally with LoRAs stacked")
    g.add_argument("--base-model")
    g.add_argument("--lora", action="append", help="FILE[:WEIGHT]; repeat to stack")
    g.add_argument("--prompt", required=True, help="may contain <lora:name:weight>")
    g.add_argument("--negative", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--grid", action="append", metavar="KIND[:LORA]=V1,V2,…",
                   help="an XY grid axis: the first --grid gives the columns, a second the rows. KIND: weight:LORA, "
                        "unet:LORA, te:LORA (that LoRA's weights), lora (FILE[:W] values, or none), prompt (whole "
                        "prompts split by |), sr (search/replace in --prompt, split by |), seed. All pictures are "
                        "rendered in batched calls, each with its own mix")
    g.add_argument("--max-batch", type=int, default=8, help="pictures per batched call with --grid (memory)")
    g.add_argument("--out", required=True, help="the picture (with --grid: the labelled grid) to write")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="family, format, rank, alpha, module counts and metadata of a LoRA file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("dataset", help="check an image set and print its report (exit 0 when usable)")
    d.add_argument("dir")
    d.add_argument("--caption-extension", default=".txt")
    d.add_argument("--resolution", type=int, default=512)
    d.add_argument("--trigger-word")
    d.set_defaults(func=cmd_dataset)

    e = sub.add_parser("export", help="write a LoRA file from a run's checkpoint (the newest, or --step N)")
    e.add_argument("run_dir", help="the run folder, e.g. runs/my-style")
    e.add_argument("--step", type=int, help="the checkpoint's step (default: the newest complete one)")
    e.add_argument("--out", required=True, help="the LoRA file to write, e.g. models/Lora/my-style.safetensors")
    e.set_defaults(func=cmd_export)
    _tool_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (StudioError, OSError) as e:
        # The user's to fix, or the disk's (full, read-only, permissions): one clear line, no stack trace. Bugs
        # still raise with their trace.
        print(f"error: {one_line(e)}", file=sys.stderr)
        return _exit_code(e)
    except KeyboardInterrupt:  # generate / inspect / dataset: nothing to save
        print("interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException, limit: int = 500) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
