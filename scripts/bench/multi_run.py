"""Several LoRAs trained together in one process (trainer/multi_run.py) against one after another and against one
process per run at the same time.

    .venv/bin/python scripts/bench/multi_run.py [--steps 30] [--sd15-steps 3] [--model-dir /tmp/sd15] [--skip-sd15]

Two cases: three demo runs (models/demo, datasets/demo-style and demo-character, different ranks, learning rates and
seeds) and two runs on the full-size SD 1.5 topology at 256 px (seeded random weights, built as a diffusers folder
by scripts/bench/training.py's builder, ≈4 GB; --model-dir keeps it for the next run) on 4 synthetic pictures each,
the trainer's defaults (mixed precision "auto", cached latents and text-encoder outputs), evaluation off. Each case
three ways, every run a `python -m trainer train` process with OMP_NUM_THREADS=1:
  sequential  one process per run, one after another
  together    one process: `train --config a.toml --config b.toml …`
  parallel    one process per run, all at once
Per way: the wall time, the CPU seconds (user + system, the work itself on a shared machine) and each process's
peak RSS (os.wait4's ru_maxrss: its whole life, loading included). Targets (issue #20): together's peak RSS ≤ 1.3×
one run's (the largest of the sequential processes); together's time ≤ the sequential time.
Results: a table, the ratios, and a JSON file (--json; default runs/benchmark/multi-run-<time>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training import make_images, spawn  # beside this file: a script's own folder is sys.path[0]

from trainer.config import PROJECT_ROOT as ROOT

GB = 1024 ** 3


def demo_configs(work: Path, steps: int) -> list[dict]:
    runs = [("style", "demo-style", 8, 3e-3, 5), ("character", "demo-character", 4, 1e-3, 7),
            ("style-r16", "demo-style", 16, 2e-3, 9)]
    return [{"preset": "demo", "data": {"dataset": str(ROOT / "datasets" / data)}, "network": {"rank": rank},
             "optimizer": {"learning_rate": lr}, "training": {"steps": steps, "seed": seed},
             "sample": {"every_n_steps": 0, "steps": 2}, "evaluation": {"at_checkpoints": "off"},
             "output": {"name": name, "save_every_n_steps": 0}} for name, data, rank, lr, seed in runs]


def sd15_configs(work: Path, model: Path, steps: int) -> list[dict]:
    cfgs = []
    for i, (rank, lr) in enumerate([(8, 1e-4), (16, 2e-4)]):
        data = work / f"data{i}"
        make_images(data, 256, seed=i)
        cfgs.append({"model": {"base_model": str(model)}, "data": {"dataset": str(data), "resolution": 256},
                     "network": {"rank": rank, "alpha": float(rank)}, "optimizer": {"learning_rate": lr},
                     "training": {"steps": steps, "batch_size": 1, "seed": i},
                     # The end-of-run sample is not what is measured: as cheap as it can be.
                     "sample": {"steps": 1, "width": 64, "height": 64, "prompts": ["a benchmark"]},
                     "evaluation": {"at_checkpoints": "off"}, "output": {"name": f"sd15-{i}", "save_every_n_steps": 0}})
    return cfgs


def write_configs(cfgs: list[dict], folder: Path) -> list[Path]:
    """One TOML per run, its output and run folder inside `folder` (so every way starts from nothing)."""
    from trainer.config import build_config

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in cfgs:
        name = layer["output"]["name"]
        layer = {**layer, "output": {**layer["output"], "lora_dir": str(folder / "Lora"),
                                     "run_dir": str(folder / "runs" / name)}}
        path = folder / f"{name}.toml"
        path.write_text(build_config(layer).to_toml(), encoding="utf-8")
        paths.append(path)
    return paths


def start(configs: list[Path], log: Path) -> subprocess.Popen:
    args = [a for c in configs for a in ("--config", str(c))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], cwd=log.parent, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(procs: list[subprocess.Popen]) -> list[dict]:
    """Waits for each; its peak RSS and CPU seconds (os.wait4: this child alone)."""
    out = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"a training failed (exit {code}); its log: {proc.log}")
        out.append({"rss_gb": usage.ru_maxrss * 1024 / GB, "cpu_s": usage.ru_utime + usage.ru_stime})
    return out


def measure(cfgs: list[dict], work: Path) -> dict:
    rows = {}
    for way in ("sequential", "together", "parallel"):
        folder = work / way
        paths = write_configs(cfgs, folder)
        began = time.time()
        if way == "sequential":
            procs = []
            for p in paths:
                procs += finish([start([p], folder / f"{p.stem}.log")])
        elif way == "together":
            procs = finish([start(paths, folder / "together.log")])
        else:
            procs = finish([start([p], folder / f"{p.stem}.log") for p in paths])
        rows[way] = {"wall_s": round(time.time() - began, 1), "cpu_s": round(sum(p["cpu_s"] for p in procs), 1),
                     "rss_gb": [round(p["rss_gb"], 3) for p in procs]}
        print(f"  {way:<11} wall {rows[way]['wall_s']:7.1f} s   cpu {rows[way]['cpu_s']:7.1f} s   peak RSS "
              f"{', '.join(f'{r:.2f}' for r in rows[way]['rss_gb'])} GB", flush=True)
    seq, tog, par = rows["sequential"], rows["together"], rows["parallel"]
    one = max(seq["rss_gb"])
    rows["ratios"] = {
        "together_rss_over_one_run": round(tog["rss_gb"][0] / one, 3),  # target ≤ 1.3
        "together_rss_over_parallel_sum": round(tog["rss_gb"][0] / sum(par["rss_gb"]), 3),
        "together_wall_over_sequential": round(tog["wall_s"] / seq["wall_s"], 3),  # target ≤ 1
        "together_cpu_over_sequential": round(tog["cpu_s"] / seq["cpu_s"], 3),
    }
    print("  ratios: " + ", ".join(f"{k} {v}" for k, v in rows["ratios"].items()), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps of each demo run")
    ap.add_argument("--sd15-steps", type=int, default=3, help="optimiser steps of each SD 1.5 run")
    ap.add_argument("--model-dir", help="the SD 1.5 folder to build (or reuse when it exists)")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--json", help="where to write the results")
    args = ap.parse_args(argv)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="multi-run-") as tmp:
        work = Path(tmp)
        print(f"3 demo runs, {args.steps} steps each", flush=True)
        results["demo"] = measure(demo_configs(work, args.steps), work / "demo")
        if not args.skip_sd15:
            model = Path(args.model_dir) if args.model_dir else work / "sd15"
            if not (model / "model_index.json").exists():
                print(f"building the SD 1.5 topology with random weights in {model}", flush=True)
                spawn({"kind": "build", "seed": 0, "model": str(model)}, work / "build")
            print(f"2 SD 1.5 runs at 256 px, {args.sd15_steps} steps each", flush=True)
            results["sd15_256"] = measure(sd15_configs(work, model, args.sd15_steps), work / "sd15-runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.json) if args.json else ROOT / "runs" / "benchmark" / f"multi-run-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
