"""The model runner's per-step metadata: what the kernels read is laid out so that a kernel compiles once."""

from __future__ import annotations

import torch

from hopperllm import LLM
from hopperllm.worker.model_runner import _aligned_offsets, _leading_ones


def test_aligned_offsets_and_leading_ones():
    assert _aligned_offsets([3, 0, 5, 4], 4) == [0, 4, 4, 12, 16]
    assert _aligned_offsets([], 2) == [0]
    assert _leading_ones([1, 1, 7, 1]) == 2
    assert _leading_ones([5, 1]) == 0
    assert _leading_ones([1, 1]) == 2


def test_every_metadata_tensor_starts_16_byte_aligned(monkeypatch):
    """Triton specializes on 16-byte pointer alignment: metadata at batch-dependent offsets would compile a
    kernel variant per alignment class while serving. Any batch shape gives aligned parts."""
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=64, show_progress=False,
              max_num_batched_tokens=40, enable_prefix_caching=False)  # fmt: skip
    runner = llm.engine.executor.runner
    seen = []
    orig = runner._prepare

    def spy(*a, **k):
        out = orig(*a, **k)
        ids, pos, meta, sample_idx, _, fill = out
        tensors = [
            ids,
            pos,
            sample_idx,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.slot_mapping,
            meta.block_tables,
        ]
        seen.append([(t.storage_offset() * t.element_size()) % 16 for t in tensors])
        return out

    monkeypatch.setattr(runner, "_prepare", spy)
    from hopperllm import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in (3, 17, 29, 6, 11)
    ]
    llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert seen and all(off == 0 for step in seen for off in step), seen
