"""Checkpoint loaders: HF safetensors directories, GGUF files, dummy (random) weights, FP8 checkpoints."""
