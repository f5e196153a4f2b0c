"""Tools on LoRA files and base models: resize, merge (and convert), bake, extract.

Each is one engine function the CLI (`python -m trainer resize | merge | bake | extract`) and the Gallery's Tools
panel both call; each writes its output atomically, never over an input, and over an existing file only when asked.
"""
from .bake import bake
from .extract import extract
from .lowrank import RankRule, parse_dynamic
from .merge import merge, parse_weighted
from .output import ToolError, ToolResult
from .resize import resize

__all__ = ["RankRule", "ToolError", "ToolResult", "bake", "extract", "merge", "parse_dynamic", "parse_weighted",
           "resize"]
