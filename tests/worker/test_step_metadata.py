"""The model runner's per-step metadata: what the kernels read is laid out so that a kernel compiles once."""

from __future__ import annotations

import numpy as np
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


def test_block_table_rows_equal_the_tables_under_any_edits():
    """_BlockTableRows keeps numpy copies of block tables, taking only what was appended since the last
    gather while a table's version holds: after any mix of appends, truncations, clears, plain-list tables and
    released sequences, a gather equals the tables zero-padded."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from hopperllm.engine.sequence import BlockTable
    from hopperllm.worker.model_runner import _BlockTableRows

    class Seq:
        def __init__(self, seq_id):
            self.seq_id, self.block_table = seq_id, BlockTable()

    op = st.tuples(st.sampled_from(["append", "extend", "truncate", "clear", "set", "plain", "release"]),
                   st.integers(0, 5), st.integers(0, 9))  # fmt: skip

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.lists(op, max_size=6), max_size=12))
    def check(steps):
        rows = _BlockTableRows(width=12, capacity=2)
        seqs = {}
        for ops in steps:
            for kind, which, value in ops:
                s = seqs.setdefault(which, Seq(f"s{which}"))
                bt = s.block_table
                if kind == "append" and len(bt) < 12:
                    bt.append(value)
                elif kind == "extend":
                    bt.extend([value] * min(2, 12 - len(bt)))
                elif kind == "truncate":
                    del bt[value % (len(bt) + 1) :]
                elif kind == "clear":
                    bt.clear()
                elif kind == "set" and bt:
                    bt[value % len(bt)] = value + 100
                elif kind == "plain":
                    s.block_table = list(bt)  # as logits_for_tokens gives one
                elif kind == "release":
                    rows.release([s.seq_id])
                    del seqs[which]
            if seqs:
                live = list(seqs.values())
                width = max(1, max(len(s.block_table) for s in live))
                got = rows.gather(live, width)
                want = np.zeros((len(live), width), dtype=np.int32)
                for i, s in enumerate(live):
                    want[i, : len(s.block_table)] = s.block_table
                assert (got == want).all()
                assert (rows.rows[:, width:] == 0).all() or width == 12

    check()
