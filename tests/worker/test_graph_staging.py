"""Decode steps that a CUDA graph runs: the model runner stages their inputs straight into the graphs' static
buffers (padding rows included) and, up to HEAD_IN_GRAPH_MAX_BS, takes the logits the graph computed. On a
CPU the graph is replaced by the same model run eagerly on those buffers at the padded batch: the tokens must
equal the engine's without graphs."""

from __future__ import annotations

import pytest
import torch

from hopperllm import LLM, SamplingParams
from hopperllm.worker.cuda_graphs import DecodeGraphRunner


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
def test_staged_graph_steps_equal_eager_steps(async_scheduling, head_max_bs):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = _generate(_llm(async_scheduling), params)
    llm = _llm(async_scheduling)
    runner = llm.engine.executor.runner
    gr = EagerGraphRunner(runner, [1, 2, 4, 8])
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
