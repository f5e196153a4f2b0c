"""Host memory on Linux: how freed blocks are kept or returned, and dropping pages of memory-mapped weights.

Training on a CPU allocates and frees thousands of activation blocks (MBs each) per step. What glibc's
allocator does with them decides both the speed and the resident size:

- By default glibc serves big blocks from their own memory maps and, as big blocks are freed, raises the size
  it maps and trims the top of its heap. Either way much of a step's memory is given back to the OS and faulted
  in (zeroed page by page) again by the next step: 170 000 page faults, 0.25-0.76 s of system time per SD 1.5
  step at 256 px.
- `keep_freed_memory` (the default when training or generating on the CPU) keeps freed blocks on the heap for
  the next step. `scripts/bench/training.py`, side by side with glibc's defaults (fwd-fp32 / fwd-fp32-glibc,
  fwdbwd-fp32 / fwdbwd-fp32-glibc), SD 1.5 fp32: a forward pass 0.83× the time at 256 px and 0.91× at 512 px,
  a forward + backward with our LoRA 0.91× and 0.98×; its cost is the heap's fragmentation: the same peak RSS at
  256 px, +0.44 GB (6.62 -> 7.06 GB) for the forward + backward at 512 px.
- `return_big_blocks_to_the_os` (training.return_freed_memory, the low-memory preset) maps every block of 4 MB
  and more on its own, so it is unmapped when freed: the lowest peak, the slowest steps.

Weights that diffusers / transformers load from a .safetensors file in their stored precision stay a private
memory map of that file. Their pages count as resident once read, and stay so while any tensor of the file
lives, even after the module that read them is dropped: `release_file_pages` tells the kernel to drop them.

Everything here is a no-op off Linux/glibc.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MADV_DONTNEED = 4
BIG_BLOCK = 4 * 2**20
KEEP_BELOW = 2**30  # mallopt takes an int: blocks below 1 GiB come from the heap
NEVER_TRIM = 2**31 - 1


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt, libc.malloc_trim  # musl has neither
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> None:
    """Freed blocks stay on the heap and serve the next step instead of being faulted in again."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)
        libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)


def return_big_blocks_to_the_os() -> None:
    """training.return_freed_memory: every block of 4 MB or more gets its own map, unmapped when freed.

    The heap then cannot fragment between the set-up (VAE encoding at full resolution) and the steps, or between
    forward and backward. `scripts/bench/training.py` (ours-fp32-freed / ours-fp32), SD 1.5 fp32: peak RSS 4.32 vs
    4.33 GB at 256 px and 5.42 vs 5.80 GB at 512 px, for steps 1.26× and 1.15× as long, since every big block is
    a fresh, zeroed map (docs/benchmark-results/2026-11-28-sd15-cpu-lora-products.json; before lean.py's LoRA
    products, 7.08 → 5.97 GB at 512 px). Off by default, on in the low-memory preset.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, BIG_BLOCK)


def trim_heap() -> None:
    """Give the heap's free pages back to the OS once (after the set-up, whose buffers the steps do not reuse)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's private file mappings (/proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and parts[1].endswith("p"):
                    start, end = parts[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of file-mapped tensors; returns the bytes advised away.

    Only whole pages inside a tensor are dropped, so a neighbour sharing its first or last page is untouched.
    Reading such a tensor again is still correct: a private file map re-reads dropped pages from the file
    (the page cache, usually). Pages a process wrote to would be lost, but frozen base weights are never
    written. Anything not in a file map (a cast copy, a GPU tensor) is left alone.
    """
    libc = _libc()
    if libc is None:
        return 0
    maps = _file_maps()
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        begin = t.data_ptr()
        end = begin + t.numel() * t.element_size()
        if not any(lo <= begin and end <= hi for lo, hi in maps):
            continue
        first, last = -(-begin // page) * page, end // page * page
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0:
            released += last - first
    return released
