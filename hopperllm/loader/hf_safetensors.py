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
    hq_path = os.path.join(path, "hf_quant_config.json")
    if "quantization_config" not in cfg and os.path.isfile(hq_path):
        # Older NVIDIA ModelOpt exports describe the quantization only in hf_quant_config.json.
        try:
            with open(hq_path) as f:
                hq = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{hq_path} is not valid JSON: {e}") from e
        if isinstance(hq, dict) and isinstance(hq.get("quantization"), dict):
            cfg["quantization_config"] = {"quant_method": "modelopt", **hq["quantization"]}
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


def iter_safetensors(
    path: str, device: str = "cpu", lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """Yield (name, tensor) for every tensor of every shard, in file order. With `lazy`, yield
    LazyTensors instead: a tensor-parallel rank's load_shard narrows each to its slice before reading."""
    from safetensors import SafetensorError, safe_open

    for f in safetensors_files(path):
        try:
            with safe_open(f, framework="pt", device=device) as sf:
                for name in sf.keys():
                    yield name, LazyTensor(sf.get_slice(name)) if lazy else sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {f}: {e}") from e


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyTensor:
    """A checkpoint tensor not read yet. `narrow` and basic slicing (`t[a:b]`, `t[:, a:b]`) only pick the
    part to read; anything else (a torch function, a tensor method, `dst.copy_(t)`) reads that part
    first. The layers' load_shard narrow a checkpoint tensor to their rank's shard, so through this a
    tensor-parallel rank reads only its slices of a large checkpoint."""

    def __init__(self, sf_slice, index: tuple[slice, ...] | None = None):
        self._slice = sf_slice
        if index is None:
            index = tuple(slice(0, n) for n in sf_slice.get_shape())
        self._index = index
        self.shape = torch.Size(s.stop - s.start for s in index)
        self.dtype = _SAFETENSORS_DTYPES[sf_slice.get_dtype()]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % self.dim()
        if not (0 <= start and length >= 0 and start + length <= self.shape[dim]):
            raise IndexError(
                f"narrow({dim}, {start}, {length}) is out of range for shape {tuple(self.shape)}"
            )
        index = list(self._index)
        first = index[dim].start + start
        index[dim] = slice(first, first + length)
        return LazyTensor(self._slice, tuple(index))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) > self.dim() or not all(isinstance(k, slice) for k in keys):
            return self.materialize()[key]
        out = self
        for dim, k in enumerate(keys):
            r = range(self.shape[dim])[k]
            if r.step != 1:
                return self.materialize()[key]
            out = out.narrow(dim, r.start, len(r))
        return out

    def materialize(self) -> torch.Tensor:
        return self._slice[self._index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def read(x):
            return x.materialize() if isinstance(x, LazyTensor) else x

        return func(*tree_map(read, args), **tree_map(read, kwargs or {}))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"
