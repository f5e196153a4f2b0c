"""Shared test set-up: the project root and tests/ on sys.path, offline by construction, fewer threads."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# Nothing in the tests may reach a model hub; these make any attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# Tests that run only when their marker is asked for (`-m walkthrough`, `-m proof`), never in the whole suite:
# each trains demo LoRAs for many minutes (the README walk-through also rewrites the README's pictures).
OPT_IN = ("walkthrough", "proof")


def pytest_collection_modifyitems(config, items):
    asked = config.getoption("markexpr") or ""
    for marker in OPT_IN:
        if marker in asked:
            continue
        skipped = [item for item in items if item.get_closest_marker(marker)]
        if skipped:
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
            config.hook.pytest_deselected(items=skipped)
