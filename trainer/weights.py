"""Reading weight files: a .safetensors file tensor by tensor, each cast to the training precision as it arrives
(`read_cast`), and a single-file checkpoint's tensors (`read_state`: .safetensors, or .ckpt without pickle code).

Why not safetensors' own load_file: it memory-maps the file, and every mapped page a cast reads stays resident in
the process until the whole map is dropped. Casting an fp32 SD 1.5 UNet to bf16 that way holds the 3.4 GB of fp32
pages and the 1.7 GB bf16 copy at once (5.4 GB peak, measured); read here, one tensor at a time with ordinary
reads, the peak is the bf16 copy plus the largest tensor (2.2 GB). Without a cast nothing is gained, and callers
keep the memory map (its pages are shared with the OS file cache and cost nothing until used).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, each
tensor's bytes little-endian and contiguous at begin..end of the data block.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from .errors import ModelError, StudioError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # the format's own limit


class WeightsError(StudioError):
    """A file that is not a readable .safetensors file; the message names it and what is wrong."""


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data block) of a .safetensors file, without reading any tensor."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a .safetensors file: it is {len(head)} bytes long")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER:
            raise WeightsError(f"{path}: not a .safetensors file: its header would be {size} bytes")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: not a .safetensors file: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a .safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size


def needs_cast(path: str | Path, dtype: torch.dtype) -> bool:
    """True if some floating-point tensor of the file is stored in another dtype than `dtype`. False when the file
    holds a dtype this reader does not know: safetensors' own reader (the callers' other path) may know it."""
    entries, _, _ = read_header(path)
    stored = [DTYPES.get(e.get("dtype")) for e in entries.values()]
    if None in stored:
        return False
    return any(d.is_floating_point and d != dtype for d in stored)


def read_cast(path: str | Path, dtype: torch.dtype | None,
              keep=lambda name: False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; floating-point tensors cast to `dtype` one at a time, except
    those whose name `keep(name)` is true (they stay as stored). dtype None reads every tensor as stored."""
    path = Path(path)
    entries, metadata, start = read_header(path)
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # sequential reads
            try:
                stored = DTYPES[entry["dtype"]]
            except KeyError:
                raise WeightsError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not "
                                   f"know ({', '.join(DTYPES)})") from None
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            numel = 1
            for n in shape:
                numel *= n
            if end - begin != numel * stored.itemsize:
                raise WeightsError(f"{path}: tensor {name} should take {numel * stored.itemsize} bytes for shape "
                                   f"{shape} in {entry['dtype']}, the header says {end - begin}: a damaged file")
            tensor = torch.empty(shape, dtype=stored)
            if numel:
                f.seek(start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - begin:
                    raise WeightsError(f"{path}: ends inside tensor {name}: the file is truncated (an unfinished "
                                       f"download?); download it again")
            if dtype is not None and stored.is_floating_point and stored != dtype and not keep(name):
                tensor = tensor.to(dtype)
            state[name] = tensor
    return state, metadata


# ---- single-file checkpoints (.safetensors / .ckpt in the original layout) -------------------------------------

def not_safetensors(path: Path, error: Exception) -> ModelError:
    return ModelError(f"{path}: not a valid .safetensors file ({error}); an interrupted download or a renamed "
                      f"file? Download it again or pick another checkpoint")


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt through torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = f" (it contains {found.group(1)})" if found else ""
            raise ModelError(f"{path}: refused: this .ckpt holds Python objects besides tensors{what}, and "
                             f"unpickling them could run arbitrary code. Convert it to .safetensors with a tool "
                             f"you trust, or use a .safetensors download of the same model.") from e
        raise ModelError(f"{path}: not a checkpoint: torch.load cannot read it ({e})") from e
    except Exception as e:
        raise ModelError(f"{path}: not a checkpoint: torch.load cannot read it ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning wraps the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# Some older checkpoints lack CLIP's `text_model.` level; A1111 reads them by the same renaming.
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def read_state(path: Path, dtype: torch.dtype | None = None,
               keep=lambda name: False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a single-file checkpoint. With `dtype`, a .safetensors file stored in another
    precision is read tensor by tensor and cast as it arrives (trainer/weights.py: half the peak memory of casting
    a memory map); tensors whose name `keep(name)` is true stay as stored. Otherwise the file is memory-mapped."""
    if path.suffix.lower() == ".ckpt":
        state, metadata = read_pickle(path), {}
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            if dtype is not None and needs_cast(path, dtype):
                state, metadata = read_cast(path, dtype, keep)
            else:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                state = load_file(str(path))
        except Exception as e:
            raise not_safetensors(path, e) from e
    for prefix in CLIP_PREFIXES:
        old = [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "text_model.")]
        for k in old:
            state[prefix + "text_model." + k.removeprefix(prefix)] = state.pop(k)
    return state, metadata
