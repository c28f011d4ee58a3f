"""HF model directories: config.json, *.safetensors (sharded or not), tokenizer files."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch


def read_hf_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} is not a model directory: it has no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    return cfg


def safetensors_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (hopperllm does not load .bin checkpoints)")
    return files


def count_safetensors_tensors(path: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in safetensors_files(path):
        with safe_open(f, framework="pt") as sf:
            n += len(list(sf.keys()))
    return n


def iter_safetensors(path: str, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every shard, in file order."""
    from safetensors import SafetensorError, safe_open

    for f in safetensors_files(path):
        try:
            with safe_open(f, framework="pt", device=device) as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {f}: {e}") from e
