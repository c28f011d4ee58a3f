"""Beam search (vLLM's LLM.beam_search and the server's use_beam_search) against a search written here over
the model's full-sequence logits (the engine's other path to them)."""

from __future__ import annotations

import math

import pytest
import torch

from hopperllm import LLM, SamplingParams
from hopperllm.sampling_params import BeamSearchParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="dummy:tiny", device="cpu", max_model_len=96, show_progress=False)


def _reference(llm: LLM, prompt: list[int], width: int, steps: int, eos=()) -> list[tuple[list[int], float]]:
    """The same search from logits_for_tokens: candidates are the top 2 x width next tokens of each beam,
    the width best by cum_logprob / length (length_penalty 1, the prompt counted) survive."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        cands = []
        for tokens, cum in beams:
            lp = torch.log_softmax(llm.engine.executor.logits_for_tokens(tokens)[-1].double(), -1)
            top = torch.topk(lp, 2 * width)
            cands += [
                (tokens + [t], cum + v)
                for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        beams = sorted(cands, key=lambda b: b[1] / len(b[0]), reverse=True)[:width]
    return beams


def test_beam_width_one_is_greedy(llm):
    prompt = llm.get_tokenizer().encode("Once upon a time")
    out = llm.beam_search(
        {"prompt_token_ids": prompt}, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True)
    )
    greedy = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    (seq,) = out[0].sequences
    assert seq.tokens == prompt + greedy.token_ids and seq.finish_reason == "length"
    assert seq.text == llm.get_tokenizer().decode(seq.tokens)  # vLLM's LLM.beam_search: the prompt's text too


@pytest.mark.parametrize("width", [2, 3])
def test_beams_equal_a_search_over_full_logits(llm, width):
    prompt = llm.get_tokenizer().encode("abc")
    out = llm.beam_search(["abc"], BeamSearchParams(beam_width=width, max_tokens=3, ignore_eos=True))[0]
    ref = _reference(llm, prompt, width, 3)
    assert [s.tokens for s in out.sequences] == [t for t, _ in ref]
    for s, (_, cum) in zip(out.sequences, ref, strict=True):
        assert math.isclose(s.cum_logprob, cum, abs_tol=1e-3)
        assert len(s.logprobs) == 3 and math.isclose(
            sum(lp[t] for lp, t in zip(s.logprobs, s.tokens[len(prompt) :], strict=True)),
            s.cum_logprob,
            abs_tol=1e-6,
        )


def test_eos_ends_a_beam_and_bad_params(llm):
    eos = sorted(llm.engine.eos_token_ids)[0]
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    out = llm.beam_search([[1, 5, 6], [1, 7]], params)
    assert len(out) == 2 and all(len(o.sequences) == 2 for o in out)
    for o in out:
        for s in o.sequences:
            ended = eos in s.tokens[3:]
            assert s.finish_reason == ("stop" if ended else "length")
    for bad in (dict(beam_width=0, max_tokens=2), dict(beam_width=2, max_tokens=0)):
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(ValueError, match="max_logprobs"):  # a step's 2 x 11 logprobs: over the default 20
        llm.beam_search(["abc"], BeamSearchParams(beam_width=11, max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
