"""Calibration for FP8: the text to run, and the activation ranges it produces.

Text. With no download, the default text is the English documentation in Python's standard library,
`pydoc_data.topics.topics` (a dict of topic name -> text). Its topics are sorted by name and split by
count: the first 80% calibrate (static activation and KV-cache scales), the last 20% are held out for
evaluation (`hopperllm eval perplexity`), so no evaluated token was seen during calibration. The text
ships with the interpreter, so it differs slightly between Python versions; results record the version.

Ranges. `calibrate` runs the unquantized model over the calibration tokens in chunks, through the same
paged path that serves requests, with forward pre-hooks that keep running absolute maxima of
- every linear layer's input (-> static `input_scale` = amax / 448), and
- every attention layer's K after rotary embedding and V (-> `k_scale`, `v_scale` = amax / 448), which are
  exactly the values an FP8 KV cache stores.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

CALIBRATION_FRACTION = 0.8


def _topic_split() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    n_calib = int(len(names) * CALIBRATION_FRACTION)
    return names[:n_calib], names[n_calib:]


def calibration_text() -> str:
    """The first 80% of `pydoc_data.topics` (sorted by topic name), concatenated."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in _topic_split()[0])


def eval_text() -> str:
    """The held-out last 20% of `pydoc_data.topics`: disjoint from `calibration_text()`."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in _topic_split()[1])


def text_source(split: str) -> dict[str, object]:
    """What a result was measured on, for reports."""
    calib, held_out = _topic_split()
    names = calib if split == "calibration" else held_out
    return {
        "text": f"pydoc_data.topics, {split} split",
        "topics": f"{names[0]} .. {names[-1]} ({len(names)} of {len(calib) + len(held_out)}, sorted)",
        "python": sys.version.split()[0],
    }


def read_text_file(path: str | None, what: str = "text file") -> str | None:
    """The UTF-8 text of a user-given file (None for no file); a missing file is the user's ValueError."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def chunk_tokens(token_ids: list[int], chunk_len: int, min_len: int = 2) -> list[list[int]]:
    """Consecutive non-overlapping chunks of `chunk_len` tokens; a last chunk shorter than min_len is dropped."""
    if chunk_len < 2:
        raise ValueError(f"the context length must be at least 2 tokens, got {chunk_len}")
    chunks = [token_ids[i : i + chunk_len] for i in range(0, len(token_ids), chunk_len)]
    return [c for c in chunks if len(c) >= min_len]


@dataclass
class CalibrationStats:
    """Absolute maxima seen during calibration, keyed by our module names (e.g.
    `model.layers.0.self_attn.qkv_proj`, `model.layers.0.self_attn.attn`)."""

    input_amax: dict[str, float] = field(default_factory=dict)
    k_amax: dict[str, float] = field(default_factory=dict)
    v_amax: dict[str, float] = field(default_factory=dict)
    v_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 [num_kv_heads, head_dim]
    num_tokens: int = 0


class AmaxObserver:
    """Forward pre-hooks on a model's linear and attention layers that record running absolute maxima,
    and per attention layer the sum of V per KV head and channel (for `center.center_v_cache_`).

    Both stay on the model's device until `stats()` (no host sync per layer call)."""

    def __init__(self, model: nn.Module):
        from hopperllm.layers.attention import Attention
        from hopperllm.layers.linear import LinearBase

        self._amax: dict[tuple[str, str], torch.Tensor] = {}
        self._v_sum: dict[str, torch.Tensor] = {}
        self._v_count: dict[str, int] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            elif isinstance(module, Attention):
                self._handles.append(module.register_forward_pre_hook(self._attention_hook(name)))

    def _update(self, key: tuple[str, str], x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        a = x.detach().abs().amax().float()
        prev = self._amax.get(key)
        self._amax[key] = a if prev is None else torch.maximum(prev, a)

    def _linear_hook(self, name: str) -> Callable:
        def hook(module, args):
            self._update(("input", name), args[0])

        return hook

    def _attention_hook(self, name: str) -> Callable:
        from hopperllm.layers.rotary import apply_rotary_native

        def hook(module, args):
            positions, _q, k, v = args[:4]
            t = k.shape[0]
            k = k.reshape(t, module.num_kv_heads, module.head_dim)
            # The cache stores K after rotary; rotate here so the hook does not depend on the backend.
            self._update(("k", name), apply_rotary_native(k, positions, module.cos_sin_cache))
            self._update(("v", name), v)
            if t:
                s = v.detach().reshape(t, module.num_kv_heads, module.head_dim).double().sum(0)
                prev = self._v_sum.get(name)
                self._v_sum[name] = s if prev is None else prev + s
                self._v_count[name] = self._v_count.get(name, 0) + t

        return hook

    def stats(self, num_tokens: int = 0) -> CalibrationStats:
        out = CalibrationStats(num_tokens=num_tokens)
        by_kind = {"input": out.input_amax, "k": out.k_amax, "v": out.v_amax}
        for (kind, name), a in self._amax.items():
            by_kind[kind][name] = float(a)
        out.v_mean = {name: s / self._v_count[name] for name, s in self._v_sum.items()}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> AmaxObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def calibrate(
    model: nn.Module,
    run_chunk: Callable[[list[int]], object],
    chunks: Iterable[list[int]],
    show_progress: bool = True,
) -> CalibrationStats:
    """Run `run_chunk(token_ids)` (a forward of `model`) over every chunk and return the observed maxima."""
    chunks = list(chunks)
    n = 0
    with AmaxObserver(model) as obs:
        for chunk in tqdm(chunks, desc="Calibrating", unit="chunk", disable=not show_progress, leave=False):
            run_chunk(chunk)
            n += len(chunk)
        return obs.stats(num_tokens=n)
