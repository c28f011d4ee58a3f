"""Structured outputs (vLLM's StructuredOutputsParams, through llguidance): every constrained output is
accepted by its constraint (JSON schema, JSON object, regex, choice, Lark and GBNF grammars), greedy and
sampled, alone and batched with free requests, whose outputs the constrained rows must not change."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from hopperllm import LLM, SamplingParams, StructuredOutputsParams
from hopperllm.layers.sampler import apply_token_bitmask

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


def _check_schema(text: str) -> bool:
    obj = json.loads(text)
    assert set(obj) == {"ok", "n", "tag"}
    assert isinstance(obj["ok"], bool) and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99
    assert obj["tag"] in ("red", "green")
    return True


# (constraint, check of a finished output's text)
CASES = {
    "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), _check_schema),
    "json_text": (
        StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True),
        _check_schema,
    ),
    "json_object": (
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
        lambda t: isinstance(json.loads(t), dict),
    ),
    "regex": (StructuredOutputsParams(regex=r"[a-c]{2,5}x"), lambda t: re.fullmatch(r"[a-c]{2,5}x", t)),
    "choice": (
        StructuredOutputsParams(choice=["alpha", "beta", 'say "hi"\n']),
        lambda t: t in ("alpha", "beta", 'say "hi"\n'),
    ),
    "lark": (
        StructuredOutputsParams(grammar='start: "cat" | "dog" NUM\nNUM: /[0-9]/'),
        lambda t: re.fullmatch(r"cat|dog[0-9]", t),
    ),
    "gbnf": (
        StructuredOutputsParams(grammar='root ::= "x" digits\ndigits ::= [0-9] [0-9]?'),
        lambda t: re.fullmatch(r"x[0-9]{1,2}", t),
    ),
}


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return LLM(model="dummy:tiny", device="cpu", max_model_len=96, show_progress=False)


@pytest.fixture(scope="module")
def smollm() -> LLM:
    """The default model: a real BPE vocabulary, where one token spans several characters of a constraint."""
    return LLM(show_progress=False)


def _gen(llm, prompts, params):
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_follow_the_constraint(tiny, name, temperature):
    so, check = CASES[name]
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=60, structured_outputs=so, n=2)
    for outs in _gen(tiny, ["abc", "The quick brown fox"], params):
        for out in outs:
            # every token a step the constraint allows: a fresh matcher takes the whole output
            assert tiny.engine.structured_output_manager.matcher(so).consume_tokens(out.token_ids)
            if name == "json_object" and out.finish_reason == "length":
                continue  # the random model's greedy object runs on ({"": 1111...): a prefix, checked above
            assert out.finish_reason == "stop", (name, out.text)
            assert check(out.text), (name, out.text)


@pytest.mark.parametrize("name", ["json", "choice", "regex", "gbnf"])
def test_real_vocabulary(smollm, name):
    so, check = CASES[name]
    for temperature in (0.0, 0.8):
        params = SamplingParams(temperature=temperature, seed=1, max_tokens=64, structured_outputs=so)
        out = smollm.chat(
            [{"role": "user", "content": "Answer in the format asked."}], params, use_tqdm=False
        )
        out = out[0].outputs[0]
        assert out.finish_reason == "stop" and check(out.text), out.text


def test_constrained_rows_leave_free_rows_alone(tiny):
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["abc", "Once upon a time", "xyz"]
    alone = [o[0].token_ids for o in _gen(tiny, prompts, free)]
    so = CASES["json"][0]
    constrained = SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=so)
    outs = tiny.generate(
        [prompts[0], "free?", prompts[1], "json?", prompts[2]],
        [free, constrained, free, constrained, free],
        use_tqdm=False,
    )
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    for i in (1, 3):
        _check_schema(outs[i].outputs[0].text)


def test_the_mask_only_narrows_greedy_choices(tiny):
    """A constraint that allows what the free greedy output says anyway leaves it unchanged."""
    free = _gen(tiny, ["abc"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0][0]
    so = StructuredOutputsParams(regex=re.escape(free.text) + ".*")
    out = _gen(
        tiny, ["abc"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, structured_outputs=so)
    )
    assert out[0][0].token_ids == free.token_ids


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(regex="(("), "invalid structured output"),
        (dict(json='{"type": "object", "properties": {"a": {"type": "strng"}}}'), "strng"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(grammar="start: undefined_rule"), "invalid structured output"),
    ],
)
def test_bad_constraints_are_value_errors(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(
            "abc", SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)), use_tqdm=False
        )
    assert not tiny.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(regex="a", choice=["a"]),
        dict(choice=[]),
        dict(choice=["a", ""]),
        dict(json=5),
        dict(regex=""),
    ],
)
def test_params_need_exactly_one_valid_constraint(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs))


def test_token_bitmask_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=g)
    words = torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([1, 4])
    out = apply_token_bitmask(logits, rows, words)
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")[:, :70].astype(bool)
    ref = logits.clone()
    for j, r in enumerate(rows.tolist()):
        ref[r, ~torch.from_numpy(bits[j])] = float("-inf")
    assert torch.equal(out, ref)
    assert not torch.isinf(logits).any()  # the caller's logits are left as they were


def test_batched_bitmasks_equal_one_at_a_time(tiny):
    mgr = tiny.engine.structured_output_manager
    matchers = [mgr.matcher(CASES[name][0]) for name in ("json", "regex", "choice", "lark")]
    matchers[0].consume_tokens(tiny.get_tokenizer().encode('{"ok":', add_special_tokens=False))
    batch = mgr.bitmasks(matchers)
    assert batch.shape == (4, (tiny.engine.config.model_config.vocab_size + 31) // 32)
    for row, m in zip(batch, matchers, strict=True):
        assert np.array_equal(row, mgr.bitmask(m))
