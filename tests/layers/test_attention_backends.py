"""The Triton attention backend (fused rotary + cache write, paged decode/prefill kernels) gives the same
results as the plain-torch backend inside the whole model. On CPU the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():  # compiled kernels cannot take this CPU model's tensors
    pytest.skip("runs the kernels in Triton's interpreter on a CPU model; tests/gpu runs them compiled against "
                "the reference path", allow_module_level=True)  # fmt: skip

from hopperllm import LLM, SamplingParams  # noqa: E402
from hopperllm.layers.attention import TorchAttentionBackend, TritonAttentionBackend  # noqa: E402


def _set_backend(llm: LLM, backend) -> None:
    for attn in llm.engine.executor.runner.model.attention_layers():
        attn.backend = backend


@pytest.mark.parametrize(
    ("kv_cache_dtype", "fuse_rotary", "dtype"),
    [
        ("auto", "all", "float32"),
        ("fp8", "all", "float32"),
        ("auto", "none", "float32"),
        ("fp8", "all", "float16"),
    ],
)
def test_triton_backend_matches_torch_backend(kv_cache_dtype, fuse_rotary, dtype, monkeypatch):
    # this GQA model's decode steps run rotary inside the attention launch ("all") or before it ("none");
    # a 16-bit model with an FP8 cache runs prefill's QK^T on FP8 q (PREFILL_FP8_QK; the torch backend
    # rounds q the same way, tests/layers/test_attention_native_fp8_qk.py)
    monkeypatch.setattr(TritonAttentionBackend, "fuse_decode_rotary", fuse_rotary)
    mixed_steps = []
    mixed = TritonAttentionBackend._mixed
    monkeypatch.setattr(
        TritonAttentionBackend,
        "_mixed",
        staticmethod(lambda *a: mixed_steps.append(a[-1].num_decodes) or mixed(*a)),
    )
    llm = LLM(
        model="dummy:tiny",
        dtype=dtype,
        device="cpu",
        num_kv_blocks=32,
        kv_cache_dtype=kv_cache_dtype,
        show_progress=False,
        max_num_batched_tokens=24,
        enable_prefix_caching=False,
    )
    prompts = [
        {"prompt_token_ids": torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
        for n in (5, 19, 40)
    ]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = prompts[1]["prompt_token_ids"]
    runner = llm.engine.executor.runner
    ref_logits = runner.logits_for_tokens(ids)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    _set_backend(llm, TritonAttentionBackend())
    try:
        logits = runner.logits_for_tokens(ids)
        rel = float((logits - ref_logits).norm() / ref_logits.norm())
        assert rel < (1e-4 if kv_cache_dtype == "auto" else 1e-3 if dtype == "float32" else 1e-2), rel
        # chunked prefill (budget 24 tokens) and decode through the kernels
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        _set_backend(llm, TorchAttentionBackend())
    assert out == ref
    # decodes next to a prefill chunk went through flash-decoding (prompts 5 and 19 decode while 40 prefills)
    assert mixed_steps and min(mixed_steps) >= 1
