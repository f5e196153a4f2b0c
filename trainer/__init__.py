"""LoRA Studio's training engine: plain Python, usable alone (CLI: `python -m trainer`), never imports the UI.

Submodules are imported where used; importing `trainer` itself loads nothing heavy.
"""
from .quiet import quiet_misleading_warnings

quiet_misleading_warnings()  # before any submodule imports diffusers/transformers
