"""Training speed and memory on the full-size SD 1.5 topology: our trainer against a plain diffusers + PEFT loop.

    .venv/bin/python scripts/bench/training.py --threads 1 --model-dir /tmp/sd15   # 256 and 512 px, ≈30 min on 2 cores
    .venv/bin/python scripts/bench/training.py --resolutions 256 --steps 2 --variants ref-fp32,ours-fp32,fwd-fp32

The base model is SD 1.5's exact topology (860M UNet parameters, the VAE, CLIP-L) with seeded random weights, a
diffusers folder (≈4 GB; --model-dir keeps it for the next run, else a temporary folder). Random weights cost the
same FLOPs as trained ones. Data: 4 synthetic captioned pictures. Every run is batch 1, LoRA rank 8, AdamW.

Variants, each in its own subprocess so that its peak RSS is its own (os.wait4's ru_maxrss):
  ref-fp32      scripts/bench/reference_loop.py, fp32: diffusers' train_text_to_image_lora.py loop, VAE encoder and
                text encoder run every step, LoRA on to_q/k/v/out of the UNet
  ref-bf16      the same with --mixed_precision bf16: bf16 frozen weights, the UNet under bf16 autocast
  ref-fp32-te   ref-fp32 also training a text-encoder LoRA like train_dreambooth_lora.py --train_text_encoder
  ours-fp32     trainer.loop.train, fp32, UNet-only LoRA as the reference (ours also targets proj_in/out and the
                feed-forward, 192 modules), VAE latents and text-encoder outputs cached instead of recomputed
  ours-fp32-te  the same with train_text_encoder true: the text encoder runs forward and backward every step
  ours-fp32-freed  ours-fp32 with training.return_freed_memory (the low-memory preset's allocator setting)
  ours-auto(-te) mixed_precision "auto" (bf16 where the CPU has avx512_bf16 / AMX); -te: the trainer's defaults
  ours-auto-nokeep  ours-auto with training.attention_memory_mb 0 (flash attention's recomputation everywhere)
  fwd-fp32/-bf16  one forward pass of the bare UNet under no_grad: the compute floor of a step is about two
  fwdbwd-fp32/-bf16  the UNet with our LoRA, forward + backward only (no data, optimiser, trainer): the kernels' floor
  fwdgrad-fp32/-bf16  its forward alone, gradients on: our step's forward with the trainer's kernels (bf16: kept
                attention probabilities are faster to make than flash attention's forward)
  fwd(bwd)-fp32-glibc  with glibc's defaults; the others use the trainer's allocator setting (trainer/memory.py)
Times: the median over --steps timed steps after --warmup untimed ones, wall clock and process CPU seconds (our
trainer's step boundaries: the "start" and "step" events of its events.jsonl, as the UI reads them).
On a shared machine use --threads 1 (with 2 threads a rank-8 matmul took 15-25 ms against 0.1-0.3 ms on a loaded
2-core box: the neighbours were measured); CPU seconds are then the work itself and the verdicts use them, else
wall time. Ratios within one run are what counts.
Memory: RSS as the kernel counts it, touched pages of memory-mapped weight files included; "peak RSS" is the
whole process (loading included), "RSS in steps" the peak between the first and the last step.
Results: a table, the ratios against the targets, and a JSON file (--json; default runs/benchmark/<time>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from monitor import Monitor  # beside this file: a script's own folder is sys.path[0]

from trainer.config import PROJECT_ROOT as ROOT

SD1_CONFIGS = ROOT / "trainer" / "model_configs" / "sd1"
TOKENIZER_DIR = ROOT / "trainer" / "tokenizer"

VARIANTS = {  # name: (kind, precision, train_text_encoder)
    "ref-fp32": ("reference", "no", False), "ref-bf16": ("reference", "bf16", False),
    "ref-fp32-te": ("reference", "no", True), "ours-fp32": ("ours", "no", False),
    "ours-fp32-te": ("ours", "no", True), "ours-fp32-freed": ("ours", "no", False),
    "ours-auto": ("ours", "auto", False), "ours-auto-te": ("ours", "auto", True),
    "ours-auto-nokeep": ("ours", "auto", False),
    "fwd-fp32": ("forward", "no", False), "fwd-bf16": ("forward", "bf16", False),
    "fwdbwd-fp32": ("bare", "no", False), "fwdbwd-bf16": ("bare", "bf16", False),
    "fwdgrad-fp32": ("bare", "no", False), "fwdgrad-bf16": ("bare", "bf16", False),
    "fwd-fp32-glibc": ("forward", "no", False), "fwdbwd-fp32-glibc": ("bare", "no", False),
}
# (label, numerator, denominator, limit, bf16 CPUs only): the targets; None = shown for scale only.
TARGETS = [
    ("ours fp32 / reference fp32 (equal settings, UNet-only LoRA; ours 192 modules, ref 128)", "ours-fp32", "ref-fp32", 0.8, False),
    ("ours fp32 +TE / reference fp32 +TE (equal settings, both train a text-encoder LoRA)", "ours-fp32-te", "ref-fp32-te", 0.8, False),
    ("ours fp32 +TE / reference fp32 (ours does more: trains the TE too)", "ours-fp32-te", "ref-fp32", 0.8, False),
    ("ours default precision / reference fp32", "ours-auto", "ref-fp32", 0.5, True),
    ("ours default precision +TE (all defaults) / reference fp32", "ours-auto-te", "ref-fp32", 0.5, True),
    ("ours bf16 / reference bf16 (equal precision)", "ours-auto", "ref-bf16", 0.8, True),
    ("ours fp32 step / fp32 forward pass", "ours-fp32", "fwd-fp32", 2.3, False),
    ("ours bf16 step / bf16 forward pass", "ours-auto", "fwd-bf16", 2.3, True),
    ("ours fp32 step / its own forward (fwdgrad: the trainer's kernels, gradients on)", "ours-fp32", "fwdgrad-fp32", None, False),
    ("ours bf16 step / its own forward (fwdgrad: the trainer's kernels, gradients on)", "ours-auto", "fwdgrad-bf16", None, True),
    ("reference fp32 step / fp32 forward pass (for scale)", "ref-fp32", "fwd-fp32", None, False),
    ("ours fp32 with training.return_freed_memory / without (its cost)", "ours-fp32-freed", "ours-fp32", None, False),
    ("ours bf16 with training.attention_memory_mb 1024 (default) / 0", "ours-auto", "ours-auto-nokeep", None, True),
    ("bare fp32 forward+backward / fp32 forward pass (the kernels' floor)", "fwdbwd-fp32", "fwd-fp32", None, False),
    ("bare bf16 forward+backward / bf16 forward pass (the kernels' floor)", "fwdbwd-bf16", "fwd-bf16", None, True),
    ("fp32 forward pass, trainer's allocator setting / glibc's defaults", "fwd-fp32", "fwd-fp32-glibc", None, False),
    ("bare fp32 forward+backward, trainer's allocator setting / glibc's", "fwdbwd-fp32", "fwdbwd-fp32-glibc", None, False),
]
MEMORY_TARGETS = [("ours-fp32", "ref-fp32"), ("ours-fp32-freed", "ref-fp32"), ("ours-fp32-te", "ref-fp32-te"),
                  ("ours-auto", "ref-bf16"), ("ours-auto-nokeep", "ref-bf16"), ("ours-auto-te", "ref-bf16"), ("ours-auto", "ref-fp32"), ("ours-auto-te", "ref-fp32")]
GB = 1024 ** 3


# --------------------------------------------------------------------------------------------------------------
# In the child processes


def build_model(spec: dict, monitor: Monitor) -> dict:
    """SD 1.5's topology with seeded random weights, saved as a diffusers folder our loader and diffusers read."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIGS, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIGS, subfolder="vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder"))
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                              model_max_length=77)
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(SD1_CONFIGS, subfolder="scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(spec["model"])
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(out)  # a folder with model_index.json is always complete: an interrupted build is rebuilt
    return {"unet_params": sum(p.numel() for p in unet.parameters())}


def run_ours(spec: dict, monitor: Monitor) -> dict:
    from trainer.config import build_config
    from trainer.events import read_events
    from trainer.loop import train

    run = Path(spec["work"]) / "run"
    total = spec["warmup"] + spec["steps"]
    cfg = build_config({
        "model": {"base_model": spec["model"]},
        "data": {"dataset": spec["data"], "resolution": spec["resolution"]},
        "network": {"rank": spec["rank"], "alpha": float(spec["rank"]), "train_text_encoder": spec["te"]},
        "training": {"steps": total, "batch_size": 1, "mixed_precision": spec["precision"], "seed": spec["seed"],
                     "return_freed_memory": spec["freed"], **({"attention_memory_mb": 0} if spec["nokeep"] else {})},
        # The end-of-run sample is not what is measured: make it as cheap as it can be.
        "sample": {"steps": 1, "width": 64, "height": 64, "prompts": ["a benchmark"]},
        "output": {"name": "benchmark", "lora_dir": str(run / "lora"), "run_dir": str(run)},
    })
    train(cfg)
    events = read_events(run)
    start = next(e for e in events if e["event"] == "start")
    step_events = [e for e in events if e["event"] == "step"]
    bounds = [start["t"]] + [e["t"] for e in step_events]  # step i runs from bounds[i] to bounds[i + 1]
    monitor.mark("steps", bounds[0])
    monitor.mark("end", bounds[-1])
    cpu = [monitor.cpu_at(t) for t in bounds]
    steps = [{"wall": bounds[i + 1] - bounds[i], "cpu": cpu[i + 1] - cpu[i], "loss": e["loss"]}
             for i, e in enumerate(step_events)]
    precision = {"no": "fp32"}.get(start["precision"], start["precision"])  # what "auto" resolved to
    return {"steps": steps, "precision": precision, "latent_cache": start["latent_cache"],
            "text_cache": start["text_cache"]}


def run_forward(spec: dict, monitor: Monitor) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from trainer.memory import keep_freed_memory

    if not spec["glibc"]:
        keep_freed_memory()  # our process's allocator setting, as the trainer's and the bare variant's
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(spec["model"], subfolder="unet", torch_dtype=dtype,
                                                local_files_only=True).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    side = spec["resolution"] // 8
    latents = torch.randn(1, 4, side, side, generator=gen).to(dtype)
    text = torch.randn(1, 77, 768, generator=gen).to(dtype)
    timestep = torch.tensor([500])
    steps = []
    monitor.mark("steps")
    with torch.no_grad():
        for _ in range(spec["warmup"] + spec["steps"]):
            t0, c0 = time.time(), os.times()
            unet(latents, timestep, text)
            c1 = os.times()
            steps.append({"wall": time.time() - t0, "cpu": c1.user + c1.system - c0.user - c0.system})
    monitor.mark("end")
    return {"steps": steps}


def run_bare(spec: dict, monitor: Monitor) -> dict:
    """The UNet with our LoRA (192 modules), one forward and backward per step, and nothing else: no data, no
    optimiser, no trainer. What torch's kernels make of a frozen-base LoRA step; our step cannot go below it."""
    import torch
    from diffusers import UNet2DConditionModel

    from trainer.config import NetworkConfig
    from trainer.cpu_attention import use_cpu_training_attention
    from trainer.lean import lean_forwards
    from trainer.memory import keep_freed_memory
    from trainer.network import add_lora

    if not spec["glibc"]:
        keep_freed_memory()  # as the trainer does on the CPU
    bf16 = spec["precision"] == "bf16"
    unet = UNet2DConditionModel.from_pretrained(spec["model"], subfolder="unet",
                                                torch_dtype=torch.bfloat16 if bf16 else torch.float32,
                                                local_files_only=True)
    add_lora(unet, [], NetworkConfig(rank=spec["rank"], alpha=float(spec["rank"]), train_text_encoder=False))
    lean_forwards(unet)  # as the trainer does
    use_cpu_training_attention(unet)
    unet.train()
    gen = torch.Generator().manual_seed(spec["seed"])
    side = spec["resolution"] // 8
    latents, text = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 77, 768, generator=gen)
    timestep = torch.tensor([500])
    steps = []
    monitor.mark("steps")
    for _ in range(spec["warmup"] + spec["steps"]):
        t0, c0 = time.time(), os.times()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(latents, timestep, text).sample
        if not spec["fwdgrad"]:
            out.float().pow(2).mean().backward()
        del out  # fwdgrad: the graph (and what it keeps) goes here
        unet.zero_grad(set_to_none=True)
        c1 = os.times()
        steps.append({"wall": time.time() - t0, "cpu": c1.user + c1.system - c0.user - c0.system})
    monitor.mark("end")
    return {"steps": steps}


def child_main(spec: dict) -> None:
    monitor = Monitor().start()
    kind = spec["kind"]
    if kind == "reference":
        import reference_loop  # beside this file, like monitor.py

        result = reference_loop.run(spec, monitor)
    else:
        result = {"build": build_model, "ours": run_ours, "forward": run_forward, "bare": run_bare}[kind](spec, monitor)
    monitor.stop()
    if "torch" in sys.modules:
        result["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "steps" in monitor.marks:
        result["rss_steps"] = monitor.peak_rss(monitor.marks["steps"], monitor.marks["end"])
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# In the parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spawn(spec: dict, work: Path, threads: int = 0) -> dict:
    """Run one child; returns its result plus ru_maxrss (its peak RSS over its whole life) and its run time."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work": str(work), "result": str(work / "result.json")}
    env = dict(os.environ)
    if threads:  # torch reads these at start-up, for its own ops and for MKL's
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.time()
    with open(work / "log.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (work / "log.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the {spec['kind']} child failed (exit {proc.returncode}); the end of its log:\n{tail}")
    result = json.loads((work / "result.json").read_text())
    result["rss_peak"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    result["seconds"] = round(time.time() - started, 1)
    return result


def cpu_has_bf16() -> bool:
    # What trainer.loop.resolve_precision checks; read here so the parent process never imports torch.
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_images(folder: Path, resolution: int, n: int = 4, seed: int = 0) -> None:
    """n smooth random colour fields with a few shapes, each with a caption."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(grid).resize((resolution, resolution), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, resolution * 3 // 4, 2)
            r = int(rng.integers(resolution // 16, resolution // 4))
            draw.ellipse((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a benchmark picture, number {i}, three circles, bright colours",
                                             encoding="utf-8")


def summarise(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:] or result["steps"]
    return {"wall_s": median(s["wall"] for s in timed), "cpu_s": median(s["cpu"] for s in timed),
            "wall_all": [round(s["wall"], 2) for s in result["steps"]],
            "cpu_all": [round(s["cpu"], 2) for s in result["steps"]],
            "rss_peak_gb": result["rss_peak"] / GB, "rss_steps_gb": result.get("rss_steps", 0) / GB,
            "seconds": result["seconds"],
            **{k: v for k, v in result.items() if k in ("precision", "latent_cache", "text_cache", "lora_modules",
                                                        "lora_dtype", "torch_threads")}}


def report(resolution: int, rows: dict[str, dict], bf16_cpu: bool, basis: str) -> dict:
    """Print the table and the ratios; verdicts compare `basis` ("wall" or "cpu") seconds against the targets."""
    print(f"\n=== {resolution} px, batch 1, rank 8: median of the timed steps; verdicts on {basis} time ===")
    print(f"{'variant':<18}{'precision':>10}{'s/step':>9}{'CPU s/step':>12}{'peak RSS GB':>13}{'RSS in steps':>14}"
          f"   all steps (wall s)")
    for name, r in rows.items():
        print(f"{name:<18}{r['precision']:>10}{r['wall_s']:>9.2f}{r['cpu_s']:>12.2f}{r['rss_peak_gb']:>13.2f}"
              f"{r['rss_steps_gb']:>14.2f}   {r['wall_all']}")
    ratios = []
    print(f"\n{'ratio':<72}{'wall':>7}{'CPU':>7}  target")
    for label, num, den, limit, bf16_only in TARGETS:
        if num not in rows or den not in rows:
            continue
        wall = rows[num]["wall_s"] / rows[den]["wall_s"]
        cpu = rows[num]["cpu_s"] / rows[den]["cpu_s"]
        value = cpu if basis == "cpu" else wall
        applies = limit is not None and (bf16_cpu or not bf16_only)  # without bf16 units "auto" means fp32
        target = "—" if limit is None else (f"≤ {limit}" if applies else f"(≤ {limit}: no bf16 CPU)")
        verdict = ("ok" if value <= limit else "MISSED") if applies else ""
        print(f"{label:<72}{wall:>7.2f}{cpu:>7.2f}  {target} {verdict}")
        ratios.append({"label": label, "numerator": num, "denominator": den, "wall": round(wall, 3),
                       "cpu": round(cpu, 3), "limit": limit, "met": (value <= limit) if applies else None})
    for ours, ref in MEMORY_TARGETS:
        if ours in rows and ref in rows:
            a, b = rows[ours]["rss_peak_gb"], rows[ref]["rss_peak_gb"]
            steps = rows[ours]["rss_steps_gb"] / max(rows[ref]["rss_steps_gb"], 1e-9)
            label = f"peak RSS {ours} / {ref} (in steps {steps:.2f})"
            print(f"{label:<72}{a / b:>7.2f}{'':>7}  ≤ 1 {'ok' if a <= b else 'MISSED'}")
            ratios.append({"label": f"peak RSS {ours} / {ref}", "numerator": ours, "denominator": ref,
                           "rss": round(a / b, 3), "rss_in_steps": round(steps, 3), "limit": 1.0, "met": a <= b})
    return {"variants": rows, "ratios": ratios}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="256,512", help="comma-separated pixel sizes (default 256,512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (or forward passes) per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every variant (default: torch's own "
                   "choice, one per core). 1 on a busy shared machine: see the module docstring")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default="", help="keep the random SD 1.5 folder here and reuse it (≈4 GB); "
                                                   "default: a temporary folder, deleted at the end")
    p.add_argument("--json", default="", help="results file (default runs/benchmark/<date-time>.json)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be ≥ 1 and --warmup ≥ 0, got {args.steps} and {args.warmup}")
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    if any(r % 64 for r in resolutions):
        raise SystemExit(f"--resolutions: {resolutions}: each must be a multiple of 64")
    bf16_cpu = cpu_has_bf16()
    work = Path(tempfile.mkdtemp(prefix="lora-benchmark-"))
    model = Path(args.model_dir).expanduser().resolve() if args.model_dir else work / "sd15-random"
    out_json = Path(args.json) if args.json else ROOT / "runs" / "benchmark" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    common = {"model": str(model), "rank": args.rank, "seed": args.seed, "warmup": args.warmup, "steps": args.steps}
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu_bf16": bf16_cpu,
               "threads": args.threads, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "resolutions": {}}
    started = time.time()
    log(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch threads per variant: "
        f"{args.threads or 'default'}, bf16 CPU: {bf16_cpu}")
    try:
        if not (model / "model_index.json").is_file():
            log(f"building the random-weight SD 1.5 model in {model}")  # ≈4 GB, a minute or two
            shutil.rmtree(model.with_name(model.name + ".partial"), ignore_errors=True)
            built = spawn({**common, "kind": "build"}, work / "build")
            log(f"built: {built['unet_params'] / 1e6:.0f}M UNet parameters, {built['seconds']:.0f} s")
        for res in resolutions:
            data = work / f"data-{res}"
            make_images(data, res, seed=args.seed)
            rows = {}
            for name in variants:
                kind, precision, te = VARIANTS[name]
                log(f"{res} px: {name} …")
                spec = {**common, "kind": kind, "precision": precision, "te": te, "resolution": res, "data": str(data),
                        **{k: name.endswith("-" + k) for k in ("freed", "glibc", "nokeep")},
                        "fwdgrad": name.startswith("fwdgrad")}
                rows[name] = {"precision": {"no": "fp32"}.get(precision, precision),
                              **summarise(spawn(spec, work / f"{res}-{name}", args.threads), args.warmup)}
                r = rows[name]
                log(f"{res} px: {name}: {r['wall_s']:.2f} s/step (CPU {r['cpu_s']:.2f} s), peak RSS "
                    f"{r['rss_peak_gb']:.2f} GB, steps {r['wall_all']}, {r['seconds']:.0f} s in all")
            results["resolutions"][str(res)] = report(res, rows, bf16_cpu, "cpu" if args.threads == 1 else "wall")
    finally:
        results["load_avg_end"] = os.getloadavg()
        results["minutes"] = round((time.time() - started) / 60, 1)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2), encoding="utf-8")
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {results['minutes']} min; results in {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
