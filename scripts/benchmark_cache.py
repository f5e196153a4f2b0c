"""Time to the first training step with a cold and with a warm latent cache, side by side in one run.

    .venv/bin/python scripts/benchmark_cache.py --base-model /tmp/bench/model --resolution 512 --images 8
    .venv/bin/python scripts/benchmark_cache.py --base-model models/demo --resolution 64 --images 16

Both runs are `python -m trainer train` processes on the same synthetic images with one shared cache folder:
the first finds it empty and VAE-encodes every image (and its flip), the second finds every latent there and
decodes no image at all. Printed: seconds from process start to the first step event, and the warm/cold ratio.
(scripts/benchmark.py --model-dir builds a full-size SD 1.5 model with random weights to use here.)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i in range(n):
        image = Image.new("RGB", (size, size + 64 * (i % 2)), "white")
        ImageDraw.Draw(image).ellipse((size // 8, size // 8, size * 7 // 8, size * 7 // 8), fill=colours[i % 6])
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {colours[i % 6]} circle")


def time_to_first_step(config: Path, run_dir: Path) -> tuple[float, dict]:
    from trainer.events import read_events

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"training failed:\n{err[-2000:]}")
    events = read_events(run_dir)
    first = next(e for e in events if e["event"] == "step")
    start = next(e for e in events if e["event"] == "start")
    return first["t"] - t0, start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    from trainer.config import build_config, save_config

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "data", args.images, args.resolution)
        results = {}
        for label in ("cold", "warm"):
            cfg = build_config({
                "model": {"base_model": str(Path(args.base_model).resolve())},
                "data": {"dataset": str(work / "data"), "resolution": args.resolution, "flip": True},
                "network": {"rank": 8, "train_text_encoder": False},
                "training": {"steps": 1},
                "sample": {"steps": 1, "width": 64, "height": 64},
                "output": {"name": label, "lora_dir": str(work / "loras"), "run_dir": str(work / "runs" / label)},
            })
            save_config(cfg, work / f"{label}.toml")
            seconds, start = time_to_first_step(work / f"{label}.toml", cfg.run_path())
            results[label] = {"seconds_to_first_step": round(seconds, 2), "latent_cache": start["latent_cache"]}
            print(f"{label:5s} cache: {seconds:7.2f} s to the first step", flush=True)
        ratio = results["warm"]["seconds_to_first_step"] / results["cold"]["seconds_to_first_step"]
        print(f"warm / cold: {ratio:.2f}")
        print(json.dumps({"args": vars(args), "results": results, "warm_over_cold": round(ratio, 3)}))


if __name__ == "__main__":
    main()
