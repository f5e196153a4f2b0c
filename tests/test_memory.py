"""trainer/memory.py, checked against the kernel's own counters: page faults and resident file pages."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.memory import release_file_pages

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@linux
def test_release_file_pages_drops_mapped_pages_and_keeps_values(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(2**24, dtype=torch.float32), "b": torch.full((1000,), 7.0)}, str(path))
    state = load_file(str(path))  # a private map of the file, as diffusers loads weights in their stored dtype
    a, b = state["a"], state["b"]
    assert a.sum().item() == pytest.approx(float(2**24 - 1) * 2**23, rel=1e-6)  # every page read: resident
    before = _rss_file_kb()
    released = release_file_pages([a])
    after = _rss_file_kb()
    assert released >= 64 * 2**20 - 2 * 4096  # all whole pages of the 64 MB tensor
    assert before - after >= 60 * 1024, (before, after)
    # Re-read from the file: the same values; the neighbour sharing a page is untouched.
    assert torch.equal(a, torch.arange(2**24, dtype=torch.float32))
    assert torch.equal(b, torch.full((1000,), 7.0))


@linux
def test_release_file_pages_leaves_other_memory_alone():
    t = torch.randn(2**20)
    copy = t.clone()
    assert release_file_pages([t, t[::2]]) == 0  # heap memory; a strided view
    assert torch.equal(t, copy)


FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from trainer import memory
getattr(memory, {setting!r}, lambda: None)()
faults = []
for _ in range(8):  # a training step's pattern: activations of 5-64 MB kept, then freed together
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(mb * 2**18) for mb in {sizes}]
    kept = kept[::2] + [torch.ones({sizes}[0] * 2**18)]
    del kept
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


def _faults(setting: str, sizes: list[int]) -> int:
    """Page faults over rounds 3-8 of FAULTS in a fresh process (allocator settings are per process)."""
    code = textwrap.dedent(FAULTS.format(root=str(ROOT), setting=setting, sizes=sizes))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return int(out.stdout.strip().splitlines()[-1])


@linux
@pytest.mark.parametrize("sizes", [[4, 8, 16, 8, 4, 32, 16, 2, 64], [40, 20, 10, 5]])
def test_keep_freed_memory_reuses_blocks_instead_of_faulting_them_in(sizes):
    default = _faults("glibc defaults", sizes)
    assert default > 100 * 2**20 // 4096  # glibc's defaults give big blocks back and fault them in again
    assert _faults("keep_freed_memory", sizes) < default / 2  # 0-30% of it over 8 runs each (heap layout varies)
    assert _faults("return_big_blocks_to_the_os", sizes) >= default  # the low-memory setting: always fresh maps
