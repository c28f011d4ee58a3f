"""Sampler: greedy, seeds, top-k/top-p/min-p, penalties, min_tokens, the sampling distribution, logprobs."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from hopperllm.layers.sampler import Sampler, SamplingMetadata, apply_penalties
from hopperllm.sampling_params import SamplingParams

SAMPLER = Sampler()


def build(
    params: list[SamplingParams],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    stop_ids: list[list[int]] | None = None,
    device: str = "cpu",
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        stop_ids if stop_ids is not None else [[] for _ in range(n)],
        vocab_size,
        device,
    )


def sample_many(
    logits_row: torch.Tensor, params: SamplingParams, num: int = 4000, seed: int = 0
) -> torch.Tensor:
    """Sample `num` times from one row's logits (one batch of identical rows, a fixed global seed)."""
    torch.manual_seed(seed)
    logits = logits_row.unsqueeze(0).expand(num, -1).contiguous()
    meta = build([params] * num, logits.shape[1])
    return SAMPLER(logits, meta).sampled_token_ids


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    meta = build([SamplingParams(temperature=0.0)] * 6, 50)
    assert meta.all_greedy
    out = SAMPLER(logits, meta)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(8)]
    meta = build(params, 100)
    assert not meta.all_greedy and not meta.all_random
    before = logits.clone()
    ids = SAMPLER(logits, meta).sampled_token_ids
    assert torch.equal(logits, before), "the sampler must not modify the caller's logits"
    assert torch.equal(ids[1::2], logits[1::2].argmax(-1))
    assert ((ids >= 0) & (ids < 100)).all()


def _run_seeded(
    batch_of: list[tuple[str, SamplingParams]], steps: int, vocab: int = 64
) -> dict[str, list[int]]:
    """Decode `steps` steps for named requests; request r's logits at step s depend only on (r, s)."""
    gens = {
        name: torch.Generator().manual_seed(p.seed) if p.seed is not None else None for name, p in batch_of
    }
    tokens: dict[str, list[int]] = {name: [] for name, _ in batch_of}
    for step in range(steps):
        rows = []
        for name, _ in batch_of:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
            rows.append(torch.randn(vocab, generator=g) * 2)
        torch.manual_seed(1000 + step)  # the global generator differs per composition anyway
        meta = build([p for _, p in batch_of], vocab, generators=[gens[name] for name, _ in batch_of])
        ids = SAMPLER(torch.stack(rows), meta).sampled_token_ids.tolist()
        for (name, _), t in zip(batch_of, ids, strict=True):
            tokens[name].append(t)
    return tokens


def test_seed_reproducible_across_batch_compositions():
    seeded = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    other_seeded = SamplingParams(temperature=0.7, seed=99, top_k=20)
    alone = _run_seeded([("a", seeded)], steps=6)["a"]
    mixed = _run_seeded(
        [
            ("x", SamplingParams(temperature=0.0)),
            ("y", SamplingParams(temperature=1.3)),
            ("a", seeded),
            ("b", other_seeded),
        ],
        steps=6,
    )
    reordered = _run_seeded([("b", other_seeded), ("a", seeded), ("z", SamplingParams(min_p=0.1))], steps=6)
    assert alone == mixed["a"] == reordered["a"]
    assert mixed["b"] == reordered["b"]
    assert len(set(alone)) > 1  # it really is sampling


def test_same_seed_same_samples_within_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000).expand(4, -1).contiguous()
    params = [SamplingParams(seed=5)] * 4
    gens = [torch.Generator().manual_seed(5) for _ in range(4)]
    ids = SAMPLER(logits, build(params, 1000, generators=gens)).sampled_token_ids
    assert ids.unique().numel() == 1


def test_top_k_keeps_only_the_k_largest():
    torch.manual_seed(0)
    logits = torch.randn(200)
    allowed = set(logits.topk(5).indices.tolist())
    ids = sample_many(logits, SamplingParams(top_k=5))
    assert set(ids.tolist()) == allowed


@pytest.mark.parametrize(
    ("top_p", "allowed"), [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, allowed: set[int]):
    ids = sample_many(LOGITS, SamplingParams(top_p=top_p))
    assert set(ids.tolist()) == allowed


def test_top_k_then_top_p_renormalizes():
    # top-3 renormalized: [0.526, 0.316, 0.158]: 0.526 + 0.316 >= 0.83, so {0, 1}; without top-k it is {0, 1, 2}
    assert set(sample_many(LOGITS, SamplingParams(top_k=3, top_p=0.83)).tolist()) == {0, 1}
    assert set(sample_many(LOGITS, SamplingParams(top_p=0.83)).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("min_p", "allowed"), [(0.0, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})]
)
def test_min_p_keeps_tokens_above_fraction_of_max(min_p: float, allowed: set[int]):
    ids = sample_many(LOGITS, SamplingParams(min_p=min_p))
    assert set(ids.tolist()) == allowed


def test_filters_per_row_in_one_batch():
    """Rows with different top_k / top_p / min_p (and none) side by side, both top-k code paths."""
    torch.manual_seed(0)
    vocab = 30
    base = torch.randn(vocab) * 3
    order = base.argsort(descending=True).tolist()
    probs = base.softmax(-1)
    cases = [
        (SamplingParams(top_k=3), set(order[:3])),
        (SamplingParams(), set(range(vocab))),
        (SamplingParams(top_k=7), set(order[:7])),
        (SamplingParams(min_p=0.2), {i for i in range(vocab) if probs[i] >= 0.2 * probs.max()}),
    ]
    for with_top_p in (False, True):
        rows = list(cases)
        if with_top_p:  # forces the sort-based top-k path for every row
            cum = probs[order].cumsum(0)
            keep = int((cum < 0.9).sum()) + 1
            rows.append((SamplingParams(top_p=0.9), set(order[:keep])))
        reps = 800
        params = [p for p, _ in rows for _ in range(reps)]
        torch.manual_seed(1)
        ids = SAMPLER(base.expand(len(params), -1).contiguous(), build(params, vocab)).sampled_token_ids
        for j, (_, allowed) in enumerate(rows):
            got = set(ids[j * reps : (j + 1) * reps].tolist())
            assert got <= allowed, (j, with_top_p)
            if len(allowed) <= 8:
                assert got == allowed


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_matches_softmax(temperature: float):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    num = 20000
    ids = sample_many(logits, SamplingParams(temperature=temperature), num=num, seed=123)
    observed = torch.bincount(ids, minlength=8).double()
    expected = (logits / temperature).softmax(-1).double() * num
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 26.1, chi2  # chi-square with 7 degrees of freedom: P(chi2 > 26.1) = 0.0005


def _reference_penalties(
    logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]], params: list[SamplingParams]
) -> torch.Tensor:
    out = logits.clone()
    for i, p in enumerate(params):
        for t in set(prompts[i]) | set(outputs[i]):
            x = out[i, t].item()
            out[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[i]):
            out[i, t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
    return out


def test_penalties_match_python_reference():
    torch.manual_seed(0)
    vocab = 40
    logits = torch.randn(4, vocab) * 3
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(frequency_penalty=0.5, presence_penalty=-0.7),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.1, temperature=0.0),
    ]
    prompts = [[1, 2, 3, 3, 39], [5, 6], [7, 7, 8], [0, 1, 2]]
    outputs = [[4, 4, 9], [6, 6, 6], [8, 8, 8, 10, 11], [2, 2, 12, 39]]
    meta = build(params, vocab, prompts, outputs)
    assert meta.any_penalties and meta.prompt_mask is not None
    got = apply_penalties(logits, meta)
    expected = _reference_penalties(logits, prompts, outputs, params)
    torch.testing.assert_close(got, expected)
    # the greedy row takes the argmax of the penalized logits; logprobs are taken after penalties
    params_lp = [dataclasses.replace(p, logprobs=2) for p in params]
    out = SAMPLER(logits, build(params_lp, vocab, prompts, outputs))
    assert out.sampled_token_ids[3] == expected[3].argmax()
    assert out.logprobs is not None
    torch.testing.assert_close(
        out.logprobs.logprobs[:, 0], expected.log_softmax(-1).gather(1, out.sampled_token_ids[:, None])[:, 0]
    )


def test_no_penalty_tensors_without_penalties():
    meta = build([SamplingParams(), SamplingParams(temperature=0)], 10, [[1, 2]] * 2, [[3]] * 2)
    assert not meta.any_penalties and meta.prompt_mask is None and meta.output_counts is None


def test_min_tokens_bans_stop_ids():
    vocab, eos, stop = 20, 2, 7
    logits = torch.zeros(4, vocab)
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop]),  # 1 output: both banned
        SamplingParams(temperature=0, min_tokens=3),  # 3 outputs: nothing banned
        SamplingParams(temperature=0, min_tokens=2),  # 0 outputs: only EOS given as a stop id
        SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[stop]),
    ]
    outputs = [[5], [5, 5, 5], [], [1]]
    stop_ids = [[eos, stop], [eos], [eos], [eos, stop]]
    meta = build(params, vocab, outputs=outputs, stop_ids=stop_ids)
    ids = SAMPLER(logits, meta).sampled_token_ids.tolist()
    assert logits[0, eos] == 10.0  # the ban is applied to a copy
    assert ids[0] not in (eos, stop)
    assert ids[1] == eos
    assert ids[2] == stop
    assert ids[3] not in (eos, stop)
    # a random row never samples a banned id
    many = [params[3]] * 2000
    meta = build(many, vocab, outputs=[[1]] * 2000, stop_ids=[[eos, stop]] * 2000)
    ids = SAMPLER(logits[3:4].expand(2000, -1).contiguous(), meta).sampled_token_ids
    assert not ((ids == eos) | (ids == stop)).any()


def test_logit_bias_and_allowed_token_ids():
    vocab = 30
    torch.manual_seed(0)
    logits = torch.randn(4, vocab)
    params = [
        SamplingParams(temperature=0, logit_bias={7: 100.0}),  # pushes 7 to the top
        SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100.0}),  # bans the argmax
        SamplingParams(temperature=0, allowed_token_ids=[3, 11]),
        SamplingParams(temperature=0),  # untouched
    ]
    meta = build(params, vocab)
    before = logits.clone()
    ids = SAMPLER(logits, meta).sampled_token_ids.tolist()
    assert torch.equal(logits, before)  # applied to a copy
    assert ids[0] == 7
    assert ids[1] == int(logits[1].topk(2).indices[1])
    assert ids[2] == (3 if logits[2, 3] > logits[2, 11] else 11)
    assert ids[3] == int(logits[3].argmax())
    # random rows: only the allowed ids, and a bias shifts the distribution as a logit change does
    many = 4000
    torch.manual_seed(1)
    row = torch.zeros(vocab)
    meta = build(
        [SamplingParams(allowed_token_ids=[2, 5, 9], logit_bias={5: float(np.log(2.0))})] * many, vocab
    )
    ids = SAMPLER(row.expand(many, -1).contiguous(), meta).sampled_token_ids
    counts = torch.bincount(ids, minlength=vocab).float() / many
    assert set(ids.unique().tolist()) <= {2, 5, 9}
    torch.testing.assert_close(counts[[2, 5, 9]], torch.tensor([0.25, 0.5, 0.25]), atol=0.03, rtol=0)


def test_logit_bias_comes_before_penalties_and_logprobs():
    vocab = 10
    logits = torch.zeros(1, vocab)
    logits[0, 4] = 2.0
    params = SamplingParams(temperature=0, logit_bias={4: 1.0}, repetition_penalty=2.0, logprobs=1)
    meta = build([params], vocab, prompts=[[4]])
    out = SAMPLER(logits, meta)
    # (2 + 1) / 2 = 1.5 after the repetition penalty (bias first, as in vLLM), and logprobs see that
    expected = torch.zeros(vocab)
    expected[4] = 1.5
    torch.testing.assert_close(out.logprobs.logprobs[0, 0], expected.log_softmax(-1)[4])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logit_bias": {5: 101.0}}, "logit_bias values"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ],
)
def test_logit_bias_and_allowed_ids_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logprobs_equal_log_softmax():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab) * 2
    params = [
        SamplingParams(temperature=0, logprobs=4),
        SamplingParams(logprobs=0),
        SamplingParams(temperature=0.5),
    ]
    meta = build(params, vocab)
    assert meta.max_num_logprobs == 4
    out = SAMPLER(logits, meta)
    lp = out.logprobs
    assert lp is not None and lp.token_ids.shape == (3, 5) and lp.logprobs.shape == (3, 5)
    ref = logits.log_softmax(-1)
    sampled = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], sampled)
    torch.testing.assert_close(lp.logprobs[:, 0], ref.gather(1, sampled[:, None])[:, 0])
    top = ref.topk(4, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top.indices)
    torch.testing.assert_close(lp.logprobs[:, 1:], top.values)
    expected_ranks = (ref > ref.gather(1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(lp.sampled_token_ranks, expected_ranks)
    assert lp.sampled_token_ranks[0] == 1  # greedy picks the top token


def test_logprobs_with_zero_top():
    logits = torch.randn(2, 10)
    out = SAMPLER(logits, build([SamplingParams(logprobs=0)] * 2, 10))
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (2, 1)


def test_top_k_larger_than_vocab_is_disabled():
    meta = build([SamplingParams(top_k=1000)], 10)
    assert not meta.any_top_k and int(meta.top_k[0]) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_forward_has_no_host_sync():
    device = "cuda"
    vocab = 32000
    torch.manual_seed(0)
    logits = torch.randn(6, vocab, device=device) * 3
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9], [10]]
    outputs = [[11], [12], [], [13, 13], [], []]
    stop_ids = [[2]] * 6

    def run(params: list[SamplingParams], gens: list[torch.Generator | None]) -> torch.Tensor:
        meta = SamplingMetadata.build(params, prompts, outputs, gens, stop_ids, vocab, device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids = SAMPLER(logits, meta).sampled_token_ids
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return ids.cpu()

    # penalties, min_tokens, logprobs, seeds, the sort-based top-k/top-p path, min-p, greedy and random rows
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=5),
        SamplingParams(temperature=0.8, top_k=50, seed=3),
        SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, min_tokens=4),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8, logit_bias={5: 3.0}),
        SamplingParams(temperature=1.0, allowed_token_ids=[3, 4, 5]),
    ]
    ids = run(params, [None, torch.Generator(device).manual_seed(3), None, None, None, None])
    assert ids[5].item() in (3, 4, 5)
    cpu_meta = SamplingMetadata.build(params, prompts, outputs, [None] * 6, stop_ids, vocab, "cpu")
    assert ids[0] == SAMPLER(logits.cpu(), cpu_meta).sampled_token_ids[0]
    assert ids[3] != 2
    again = run(params, [None, torch.Generator(device).manual_seed(3), None, None, None, None])
    assert again[1] == ids[1]

    # the top-k-only path (no top-p anywhere), every row random and seeded
    top_ks = (1, 5, 50, 1000, 20000, -1)
    params = [SamplingParams(top_k=k, seed=i) for i, k in enumerate(top_ks)]
    ids = run(params, [torch.Generator(device).manual_seed(i) for i in range(6)])
    assert ids[0] == logits[0].argmax().item()
    for row, k in enumerate(top_ks[1:4], start=1):
        assert ids[row].item() in set(logits[row].topk(k).indices.tolist())
