"""The built-in demo: a synthetic picture world, and metrics that measure what a LoRA taught."""
