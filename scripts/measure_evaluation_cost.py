"""What checkpoint evaluation costs: a preset's run with evaluation on, its evaluation seconds against the rest.

    .venv/bin/python scripts/measure_evaluation_cost.py [--dataset demo-style] [--out DIR] [--set key=value ...]

Trains the demo preset (ten checkpoints, each measured, and the final LoRA) on a demo dataset and reports, from
that one run's events: the seconds of each evaluation (pictures, features, validation loss), of the base
pictures, and the share of the run they took: evaluation seconds / (run seconds − evaluation seconds). The
issue's budget is 15%. Both parts run in the same process at the same time, so a busy machine slows both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts.measure_demo_loras import overrides  # noqa: E402
from trainer.demo.evaluate import demo_config  # noqa: E402
from trainer.events import read_events  # noqa: E402
from trainer.loop import train  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="demo-style", choices=["demo-style", "demo-character"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "evaluation-cost"))
    ap.add_argument("--set", action="append", default=[], help="a config override, section.key=value")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = demo_config(args.dataset, Path(args.out), overrides(args.set))
    began = time.time()
    train(cfg)
    run_seconds = time.time() - began
    events = read_events(cfg.run_path())
    evaluations = [e for e in events if e["event"] == "evaluation"]
    eval_seconds = sum(e["seconds"] for e in evaluations)
    # share_of_training is the running total T (base pictures included) over the rest, T / (elapsed − T)
    share = evaluations[-1]["share_of_training"] if evaluations else 0.0
    total_eval = share * run_seconds / (1 + share)
    base_seconds = max(total_eval - eval_seconds, 0.0)
    all_eval = eval_seconds + base_seconds
    report = {"dataset": args.dataset, "steps": cfg.training.steps, "checkpoints_measured": len(evaluations),
              "run_seconds": round(run_seconds, 1), "evaluation_seconds": round(eval_seconds, 1),
              "base_pictures_seconds": round(base_seconds, 1),
              "per_evaluation_seconds": [e["seconds"] for e in evaluations],
              "share_of_training": round(all_eval / max(run_seconds - all_eval, 1e-9), 4)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
