"""The server hands out files from the LoRA and outputs folders only."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_only_the_app_folders_are_served(studio):
    """The browser can fetch files from the LoRA and outputs folders, and nothing else on the disk."""
    import urllib.error
    import urllib.request

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{studio.url}/gradio_api/file={path}", timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    served = studio.outputs_dir / "generated" / "probe.txt"
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_text("probe")
    checkpoint = studio.models_dir / "Stable-diffusion" / "probe.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"probe")
    assert status(served) == 200
    assert status(ROOT / "pyproject.toml") == 403  # the app's own code folder (its working directory)
    assert status(checkpoint) == 403  # a checkpoint is the user's, not something to hand out
    assert status(Path("/etc/hostname")) == 403
    assert Path("/etc/hostname").exists()
    assert status(Path(str(studio.outputs_dir) + "/.." * 20 + "/etc/hostname")) == 403  # no climbing out
