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


def pytest_collection_modifyitems(config, items):
    """The README walk-through (tests/browser/test_walkthrough.py) trains two demo LoRAs and rewrites the README's
    pictures on request: it runs only when asked for by its marker (`-m walkthrough`), never in the whole suite."""
    if "walkthrough" in (config.getoption("markexpr") or ""):
        return
    skipped = [item for item in items if item.get_closest_marker("walkthrough")]
    if skipped:
        items[:] = [item for item in items if not item.get_closest_marker("walkthrough")]
        config.hook.pytest_deselected(items=skipped)
