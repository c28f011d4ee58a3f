"""SamplingParams.output_kind (vLLM's RequestOutputKind): CUMULATIVE outputs hold everything so far, DELTA
outputs only what each step added (they add up to the cumulative ones), FINAL_ONLY one output at the end;
LLM.generate asks for FINAL_ONLY without touching the caller's params."""

from __future__ import annotations

import pytest

from hopperllm import LLM, RequestOutputKind, SamplingParams

PROMPT = [5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(request):
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=64, show_progress=False,
              enable_prefix_caching=False)  # fmt: skip
    llm.engine.async_scheduling = request.param
    return llm.engine


def _params(kind: RequestOutputKind) -> SamplingParams:
    return SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1,
                          output_kind=kind)  # fmt: skip


def _outputs(engine, rid: str, params: SamplingParams):
    engine.add_request(rid, {"prompt_token_ids": PROMPT}, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_delta_outputs_add_up_to_the_cumulative_ones(engine):
    cum = _outputs(engine, "cum", _params(RequestOutputKind.CUMULATIVE))
    delta = _outputs(engine, "delta", _params(RequestOutputKind.DELTA))
    final = cum[-1].outputs[0]
    assert len(final.token_ids) == 9 and len(delta) > 1
    assert [t for o in delta for t in o.outputs[0].token_ids] == final.token_ids
    assert "".join(o.outputs[0].text for o in delta) == final.text
    assert [e for o in delta for e in o.outputs[0].logprobs] == final.logprobs
    assert [o.prompt_logprobs is not None for o in delta].count(True) == 1
    assert next(o.prompt_logprobs for o in delta if o.prompt_logprobs) == cum[-1].prompt_logprobs
    assert delta[-1].finished and not any(o.finished for o in delta[:-1])
    assert delta[-1].outputs[0].finish_reason == final.finish_reason == "length"


def test_final_only_gives_one_output_at_the_end(engine):
    cum = _outputs(engine, "cum2", _params(RequestOutputKind.CUMULATIVE))
    (only,) = _outputs(engine, "final", _params(RequestOutputKind.FINAL_ONLY))
    assert only.finished
    got, want = only.outputs[0], cum[-1].outputs[0]
    assert (got.token_ids, got.text, got.logprobs) == (want.token_ids, want.text, want.logprobs)
    assert only.prompt_logprobs == cum[-1].prompt_logprobs


def test_llm_generate_leaves_the_callers_params_alone():
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=64, show_progress=False)
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:5]}], p, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert p.output_kind == RequestOutputKind.CUMULATIVE


def test_output_kind_is_checked():
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    for bad in (3, -1, "delta", True):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)
