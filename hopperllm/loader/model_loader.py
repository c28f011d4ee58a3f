"""Resolve a model spec (None, HF directory, .gguf file, dummy:<preset>) into config, weights, tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hopperllm.config import ModelConfig
from hopperllm.distributed.parallel_state import SINGLE, TPGroup
from hopperllm.models.llama import LlamaForCausalLM
from hopperllm.tokenizer import Tokenizer

FP8_QUANT_METHODS = ("fp8", "modelopt", "compressed-tensors")


@dataclass
class ModelSource:
    kind: str  # "hf", "gguf", "dummy"
    path: str  # directory, file, or preset name
    hf_config: dict[str, Any]
    reader: Any = None  # an open gguf.GGUFReader (opening one takes seconds: do it once)
    draft: ModelSource | None = None  # speculative decoding's draft model, resolved with the target

    def without_readers(self) -> ModelSource:
        """A copy that pickles (to spawned ranks): no open GGUF reader, the draft's neither; ranks reopen."""
        draft = self.draft.without_readers() if self.draft is not None else None
        return dataclasses.replace(self, reader=None, draft=draft)

    @property
    def checkpoint_quantization(self) -> str | None:
        """'fp8' when the checkpoint itself stores FP8 weights."""
        qc = self.hf_config.get("quantization_config")
        if not qc:
            return None
        from hopperllm.loader.fp8_checkpoints import checkpoint_fp8_format

        return "fp8" if checkpoint_fp8_format(qc) else None


def resolve_model(model: str | None) -> ModelSource:
    if model is None or model == "":
        from hopperllm.loader.gguf import default_gguf_path

        return _gguf_source(default_gguf_path())
    if model.startswith("dummy:"):
        from hopperllm.loader.dummy import preset_config

        name = model.split(":", 1)[1]
        return ModelSource("dummy", name, preset_config(name))
    if not os.path.exists(model):
        raise ValueError(
            f"model path {model!r} does not exist (give an HF directory, a .gguf file or dummy:<preset>)"
        )
    if os.path.isdir(model):
        from hopperllm.loader.hf_safetensors import read_hf_config

        return ModelSource("hf", model, read_hf_config(model))
    return _gguf_source(model)


def _gguf_source(path: str) -> ModelSource:
    from hopperllm.loader.gguf import open_gguf, read_gguf_config

    reader = open_gguf(path)
    return ModelSource("gguf", path, read_gguf_config(reader), reader)


def load_tokenizer(src: ModelSource, model_config: ModelConfig) -> Tokenizer:
    if src.kind == "dummy":
        from hopperllm.loader.dummy_tokenizer import byte_tokenizer

        return byte_tokenizer(model_config.vocab_size)
    if src.kind == "gguf":
        from hopperllm.loader.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(src.reader or src.path)
    return Tokenizer.from_dir(src.path, extra_eos_token_ids=model_config.eos_token_ids)


def _weights(src: ModelSource, sharded: bool = False) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    if src.kind == "gguf":
        from hopperllm.loader.gguf import count_gguf_tensors, iter_gguf_tensors

        return iter_gguf_tensors(src.reader or src.path), count_gguf_tensors(src.reader or src.path)
    from hopperllm.loader.hf_safetensors import count_safetensors_tensors, iter_safetensors

    # sharded: each tensor-parallel rank reads only its slices (see LazyTensor)
    return iter_safetensors(src.path, lazy=sharded), count_safetensors_tensors(src.path)


def build_model(
    src: ModelSource,
    model_config: ModelConfig,
    dtype: torch.dtype,
    quantization: str | None,
    device: str | torch.device,
    tp: TPGroup = SINGLE,
    max_model_len: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> LlamaForCausalLM:
    """Make the model on `device` and fill its weights (from the checkpoint, or random for dummy)."""
    ckpt_quant = src.checkpoint_quantization
    if ckpt_quant and quantization not in (None, ckpt_quant):
        raise ValueError(
            f"the checkpoint is {ckpt_quant}-quantized; --quantization {quantization} does not apply"
        )
    quant = quantization or ckpt_quant
    with torch.device(device):
        model = LlamaForCausalLM(model_config, dtype, quant, tp, max_position=max_model_len)
    if ckpt_quant:
        _keep_ignored_layers_unquantized(model, src.hf_config["quantization_config"])
    if src.kind == "dummy":
        from hopperllm.loader.dummy import init_dummy_weights

        init_dummy_weights(model, seed=seed)
        return model.eval()
    weights, total = _weights(src, sharded=tp.world_size > 1)
    if ckpt_quant:
        from hopperllm.loader.fp8_checkpoints import normalize_fp8_checkpoint

        weights = normalize_fp8_checkpoint(weights, src.hf_config["quantization_config"])
    bar = tqdm(
        weights, total=total, desc="Loading weights", unit="tensor", disable=not show_progress, leave=False
    )
    loaded = model.load_weights(bar)
    missing = model.required_weight_names() - loaded
    if missing:
        some = ", ".join(sorted(missing)[:4])
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs (e.g. {some})")
    return model.eval()


def _keep_ignored_layers_unquantized(model: LlamaForCausalLM, qc: dict) -> None:
    """Layers a checkpoint lists as not quantized (its ignore list) stay in the model dtype."""
    from hopperllm.loader.fp8_checkpoints import ignored_linear_layers, ignored_module_patterns

    patterns = [p for p in ignored_module_patterns(qc) if p != "lm_head"]  # our LM head is never FP8
    modules = dict(model.named_modules())
    for name in ignored_linear_layers(model, patterns):
        module = modules[name]
        if module.quantization is not None:
            module.drop_quantization()


# the generation_config.json keys that set sampling defaults, as vLLM reads them (max_new_tokens -> max_tokens)
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(mode: str, src: ModelSource) -> dict[str, Any]:
    """vLLM's --generation-config: "auto" takes the sampling defaults of the model's generation_config.json
    (an HF directory's), "vllm" none, and a folder path that folder's file. Returns SamplingParams keyword
    defaults (only the keys the file sets)."""
    if mode == "vllm":
        return {}
    if mode == "auto":
        if src.kind != "hf":
            return {}
        path = os.path.join(src.path, "generation_config.json")
        if not os.path.isfile(path):
            return {}
    else:
        path = os.path.join(mode, "generation_config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"--generation-config {mode!r}: no generation_config.json there (or use auto / vllm)"
            )
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return {ours: cfg[theirs] for theirs, ours in _GENERATION_KEYS.items() if cfg.get(theirs) is not None}
