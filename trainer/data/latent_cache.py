"""The on-disk latent cache: a VAE encoding is reused while the pixels it came from are certain to be the same.

The key covers everything the pixels depend on: the file's bytes (content hash), the background colour used
for transparent pixels, the bucket, the crop and the flip, plus the VAE's identity and a format version.
Change any of them and the key changes, so a stale entry is simply never read again (a miss, then a fresh put).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path

KEY_VERSION = 1  # bump when the decode/resize/crop pipeline changes, so old entries stop matching


def latent_key(record, flip: bool, crop, vae_identity: str) -> str:
    """A file-name-safe key. `record` is an ImageRecord; `crop` is the crop's (top, left) or any JSON-able
    description of it."""
    payload = {"v": KEY_VERSION, "image": record.content_hash, "background": getattr(record, "background", ""),
               "bucket": list(record.bucket), "crop": list(crop) if isinstance(crop, tuple) else crop,
               "flip": bool(flip), "vae": str(vae_identity)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


class LatentCache:
    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached latent, or None on a miss (including an unreadable or foreign file, which is re-made)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except Exception:  # a damaged entry (disk full, killed mid-copy by hand) is just a miss
            return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        """Write atomically: a crash leaves the old entry or none, never half a file."""
        with atomic_path(self.path(key)) as tmp:
            save_file({"latent": latent.detach().to("cpu").contiguous()}, str(tmp), metadata={"key": key})

    def get_or_encode(self, key: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached latent, or encode() stored for next time: a warm cache never calls encode()."""
        latent = self.get(key)
        if latent is None:
            latent = encode()
            self.put(key, latent)
        return latent
