"""Decode steps that a CUDA graph runs: the model runner stages their inputs straight into the graphs' static
buffers (padding rows included) and, up to HEAD_IN_GRAPH_MAX_BS, takes the logits the graph computed. On a
CPU the graph is replaced by the same model run eagerly on those buffers at the padded batch: the tokens must
equal the engine's without graphs."""

from __future__ import annotations

import pytest
import torch

from hopperllm import LLM, SamplingParams
from hopperllm.layers.attention import AttentionMetadata
from hopperllm.worker.cuda_graphs import DecodeGraphRunner, PrefillGraphRunner, prefill_graph_sizes


class EagerGraphRunner(DecodeGraphRunner):
    """DecodeGraphRunner's buffers and layout; `replay` runs the model eagerly where a graph would replay."""

    def capture(self, show_progress: bool = True) -> None:
        self.replays: list[tuple[int, int]] = []

    def replay(self, n: int):
        bs = self.padded_size(n)
        self.replays.append((n, bs))
        r = self.runner
        out = r.model(self.input_ids[:bs], self.positions[:bs], r.kv_caches, self._meta(bs))
        assert (self.slot_mapping[n:bs] == -1).all() and (self.seq_lens[n:bs] == 0).all()
        if not self.has_head(bs):
            return out[:n], None
        logits = r.model.compute_logits(out)
        if self.logits is None:
            self.logits = torch.empty(self.max_bs, logits.shape[-1], dtype=torch.float32)
        self.logits[:bs].copy_(logits)
        return out[:n], self.logits[:n]


def _llm(async_scheduling: bool) -> LLM:
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=96, show_progress=False,
              max_num_batched_tokens=64, enable_prefix_caching=False)  # fmt: skip
    llm.engine.async_scheduling = async_scheduling
    return llm


PROMPT_LENS = (3, 17, 29, 6, 11)


def _generate(llm: LLM, params: SamplingParams) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in PROMPT_LENS]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("head_max_bs", [0, 2, 64])
@pytest.mark.parametrize("staging", [True, False], ids=["staged", "copied"])
def test_staged_graph_steps_equal_eager_steps(async_scheduling, head_max_bs, staging, monkeypatch):
    # (HOPPERLLM_GRAPH_STAGING=0: the step's inputs copied into the graphs' buffers, the LM head outside)
    from hopperllm.worker import model_runner

    monkeypatch.setattr(model_runner, "GRAPH_STAGING", staging)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = _generate(_llm(async_scheduling), params)
    llm = _llm(async_scheduling)
    runner = llm.engine.executor.runner
    gr = EagerGraphRunner(runner, [1, 2, 4, 8])
    assert gr.head_max_bs == (64 if staging else 0)  # only staged steps read the graph's logits
    gr.capture()
    gr.head_max_bs = head_max_bs
    runner.graph_runner = gr
    assert _generate(llm, params) == want
    # the graphs ran padded batches (5 sequences in the graph of 8, then fewer as they finish)
    assert any(bs > n for n, bs in gr.replays) and any(bs == n for n, bs in gr.replays)


def test_staged_steps_with_logprobs_and_penalties():
    # rows that need more than the greedy argmax (logprobs, penalties) read the same logits
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3, repetition_penalty=1.3)
    ref = _llm(True).generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 3, params, use_tqdm=False)
    llm = _llm(True)
    runner = llm.engine.executor.runner
    gr = EagerGraphRunner(runner, [1, 4])
    gr.capture()
    runner.graph_runner = gr
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 3, params, use_tqdm=False)
    assert gr.replays
    for a, b in zip(out, ref, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[k] - y[k]) < 1e-4 for k in x)


class EagerPrefillGraphs(PrefillGraphRunner):
    """PrefillGraphRunner's buffers and layout; `replay` runs the model eagerly on all of the graph's rows,
    keeping the staged row (the step's last) as the captured graph does."""

    def capture(self, show_progress: bool = True) -> None:
        self.replays: list[tuple[int, int]] = []  # (the step's rows, the graph's)
        self.contexts: list[int] = []  # the step's cached tokens before its rows

    def replay(self, tokens: int, n_step: int):
        cu, lens = self.cu_seqlens_q.tolist(), self.seq_lens.tolist()
        n = cu[1]
        assert cu == [0, n, tokens] and lens[1] == tokens - n and n <= lens[0] and n == n_step
        assert self.keep_row.tolist() == [n - 1]
        assert (self.slot_mapping[n:tokens] == -1).all() and (self.block_tables[1] == 0).all()
        self.replays.append((n, tokens))
        self.contexts.append(lens[0] - n)
        meta = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q, seq_lens=self.seq_lens, slot_mapping=self.slot_mapping[:tokens],
            block_tables=self.block_tables, max_seqlen_q=tokens, max_seqlen_k=max(lens), decode_only=False,
            query_lens_cpu=[n, tokens - n], seq_lens_cpu=lens,
        )  # fmt: skip
        r = self.runner
        return r.model(
            self.input_ids[:tokens], self.positions[:tokens], r.kv_caches, meta, keep_rows=self.keep_row
        )


def _prefill_llm(async_scheduling: bool, **kw) -> LLM:
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=96, show_progress=False, **kw)
    llm.engine.async_scheduling = async_scheduling
    return llm


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(max_num_seqs=1, enable_prefix_caching=False),  # every prefill alone, whole
        dict(max_num_seqs=1, max_num_batched_tokens=16, enable_prefix_caching=False),  # chunks with context
        dict(max_num_seqs=1, enable_prefix_caching=True),  # the repeated prompts' prefix hits
    ],
    ids=["whole", "chunked", "prefix-hit"],
)
def test_prefill_graph_steps_equal_eager_steps(async_scheduling, kw):
    g = torch.Generator().manual_seed(1)
    lens = (3, 17, 40, 16, 33)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in lens]
    prompts += prompts[1:3]  # again: prefix-cache hits where caching is on
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    want = run(_prefill_llm(async_scheduling, **kw))
    llm = _prefill_llm(async_scheduling, **kw)
    runner = llm.engine.executor.runner
    pg = EagerPrefillGraphs(runner, [4, 8, 16, 32, 64])
    pg.capture()
    runner.prefill_graphs = pg
    assert run(llm) == want
    assert pg.replays and any(t > n for n, t in pg.replays)
    assert any(t == n for n, t in pg.replays)  # the 16-token prompt (chunks) fills its graph exactly
    # chunks after the first and prefix hits run with cached context
    assert any(pg.contexts) == ("max_num_batched_tokens" in kw or kw["enable_prefix_caching"])


def test_prefill_graph_sizes_stay_within_a_step_and_the_model_length():
    steps = [128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]
    assert prefill_graph_sizes(8192, 4096) == steps + [2560, 3072, 3584, 4096]
    assert prefill_graph_sizes(2048, 4096) == steps
    assert prefill_graph_sizes(8192, 1000) == [128, 256, 384, 512, 640, 768, 896]
    assert prefill_graph_sizes(8192, 100) == []
    # a chunk's padding stays at most 128 rows below 256 tokens, then at most 25%
    sizes = prefill_graph_sizes(8192, 4096)
    for n in range(2, 4097):
        t = next(s for s in sizes if s >= n)
        assert t - n < 128 or (t - n) / n <= 0.25, (n, t)


def test_prefill_graphs_out_of_memory_falls_back_to_eager(monkeypatch, caplog):
    """Capturing the prefill graphs needs their memory pool beside the KV cache; without room for it the
    engine starts anyway, prefilling eagerly, and says so."""
    from hopperllm.worker import cuda_graphs

    llm = _prefill_llm(False, max_num_seqs=1)
    runner = llm.engine.executor.runner

    def oom(self, show_progress=True):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(cuda_graphs.PrefillGraphRunner, "capture", oom)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    with caplog.at_level("WARNING", logger="hopperllm.worker.cuda_graphs"):
        assert cuda_graphs.capture_prefill_graphs(runner, show_progress=False) is None
    assert "prefill steps run eagerly" in caplog.text
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert (
        len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0].token_ids)
        == 3
    )
    # with tensor parallelism a rank does not fall back alone (another may wait in a warm-up all-reduce)
    from hopperllm.distributed.parallel_state import TPGroup

    monkeypatch.setattr(runner, "tp", TPGroup(rank=0, world_size=2))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cuda_graphs.capture_prefill_graphs(runner, show_progress=False)
