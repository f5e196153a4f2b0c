"""Two start-up warnings of our dependencies that mislead our users, dropped (nothing else is filtered).

- transformers, when torchvision is missing: "`CLIPImageProcessor` requires torchvision ...; Install torchvision
  to use the default backend". We use no image processor (the safety checker is off), and installing torchvision
  with pip pulls a multi-GB CUDA build of torch over the one launch.py chose.
- bitsandbytes on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from kernels-community ... pip
  install kernels": an optional 4-bit inference kernel; our 8-bit optimiser does not use it.
"""
from __future__ import annotations

import logging

DROPPED = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_misleading_warnings() -> None:
    """Call before diffusers/transformers/peft are imported (the warnings come at import time)."""
    for name, text in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(text))
