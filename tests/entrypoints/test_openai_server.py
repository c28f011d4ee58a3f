"""The OpenAI-compatible server end to end: a real `hopperllm serve` on loopback, driven by the official
`openai` client and by httpx; outputs must equal the offline `LLM` API's for the same model and seed."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from hopperllm import LLM, SamplingParams
from tests.entrypoints.openai_utils import metric, wait_for_idle

MODEL = "dummy:tiny"
PROMPTS = ["The quick brown fox", "abc", "Once upon a time"]
CHAT = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "2+2?"}]  # 42 tokens


def _reference(llm: LLM, prompt, **params) -> list:
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs


# -- the small endpoints --------------------------------------------------------------------------
def test_models_health_version_tokenize(shared_server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = httpx.get(f"{shared_server.base_url}/v1/models", headers=shared_server.auth).json()["data"][0]
    assert (
        card["max_model_len"] == 64 and card["tensor_parallel_size"] == 1
    )  # how it is served, for bench serve
    assert card["dtype"] == "float32" and card["quantization"] is None and card["kv_cache_dtype"] == "auto"
    assert httpx.get(f"{shared_server.base_url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{shared_server.base_url}/version").json()["version"]
    auth = shared_server.auth
    tok = httpx.post(f"{shared_server.base_url}/tokenize", json={"prompt": "abc"}, headers=auth).json()
    assert tok["tokens"] == [1, 100, 101, 102] and tok["count"] == 4 and tok["max_model_len"] == 64
    chat = httpx.post(f"{shared_server.base_url}/tokenize", json={"messages": CHAT}, headers=auth).json()
    assert chat["count"] == len(chat["tokens"]) > 10
    detok = httpx.post(f"{shared_server.base_url}/detokenize", json={"tokens": [100, 101]}, headers=auth)
    assert detok.json() == {"prompt": "ab"}
    info = httpx.get(
        f"{shared_server.base_url}/tokenizer_info", headers=auth
    ).json()  # lm-eval's remote tokenizer
    assert (
        info["eos_token"] == "</s>"
        and info["bos_token"] == "<s>"
        and "{% for m in messages %}" in info["chat_template"]
    )


# -- outputs equal the offline API's ----------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_llm_generate(client, llm, prompt):
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ref = _reference(llm, prompt, max_tokens=12, temperature=0)[0]
    assert res.choices[0].text == ref.text
    assert res.choices[0].finish_reason == ref.finish_reason == "length"
    assert res.usage.completion_tokens == 12
    assert res.usage.prompt_tokens == len(llm.get_tokenizer().encode(prompt))
    assert res.usage.total_tokens == res.usage.prompt_tokens + 12


def test_seeded_sampling_equals_llm_generate(client, llm):
    # random sampling with a seed is reproducible whatever else is batched, so it must match too
    params = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    res = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        **{k: v for k, v in params.items() if k != "ignore_eos"},
        extra_body={"ignore_eos": True},
    )
    assert res.choices[0].text == _reference(llm, PROMPTS[0], **params)[0].text


def test_prompt_forms(client, llm, shared_server):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    batch = client.completions.create(
        model=MODEL, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=5, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [
        _reference(llm, p, max_tokens=5, temperature=0)[0].text for p in PROMPTS[:2]
    ]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == batch.choices[1].text
    two = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=5, temperature=0)
    assert two.choices[0].text == batch.choices[1].text
    assert (
        two.choices[1].text
        == _reference(llm, {"prompt_token_ids": ids[:2]}, max_tokens=5, temperature=0)[0].text
    )
    echo = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[1] + batch.choices[1].text[:3]


def test_default_max_tokens(shared_server, client):
    # completions: OpenAI's (and vLLM's) 16; chat: the room left in max_model_len (vLLM)
    res = client.completions.create(model=MODEL, prompt="abc", temperature=0, extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 16
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 64


def test_chat_equals_llm_chat(client, llm):
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    ref = llm.chat(CHAT, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.outputs[0].text
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)
    seeded = dict(max_tokens=10, temperature=0.8, seed=7)
    res = client.chat.completions.create(model=MODEL, messages=CHAT, **seeded)
    ref = llm.chat(CHAT, SamplingParams(**seeded), use_tqdm=False)[0]
    assert res.choices[0].message.content == ref.outputs[0].text
    # max_completion_tokens and text content parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    res = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=4, temperature=0)
    ref = llm.chat(
        [{"role": "user", "content": "What is 2+2?"}],
        SamplingParams(max_tokens=4, temperature=0),
        use_tqdm=False,
    )
    assert res.choices[0].message.content == ref[0].outputs[0].text and res.usage.completion_tokens == 4


def test_streaming_chat(client, llm):
    params = dict(max_tokens=12, temperature=0.9, seed=3)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}, **params
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    ref = llm.chat(CHAT, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert content == ref.text


def test_streaming_completion_raw_sse(shared_server, llm):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{shared_server.base_url}/v1/completions", json=body, headers=shared_server.auth
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert (
        "".join(e["choices"][0]["text"] for e in events)
        == _reference(llm, PROMPTS[0], max_tokens=6, temperature=0)[0].text
    )
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_n2(client, llm):
    params = dict(max_tokens=8, temperature=1.0, seed=11)
    res = client.completions.create(model=MODEL, prompt=PROMPTS[2], n=2, **params)
    ref = _reference(llm, PROMPTS[2], n=2, **params)
    assert [c.index for c in res.choices] == [0, 1]
    assert [c.text for c in res.choices] == [r.text for r in ref]
    assert res.usage.completion_tokens == 16
    # streaming chat interleaves the choices by index; each one's deltas add up to its text
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, stream=True, **params)
    texts, finished, order = ["", ""], [None, None], []
    for chunk in stream:
        for c in chunk.choices:
            order.append(c.index)
            texts[c.index] += c.delta.content or ""
            finished[c.index] = c.finish_reason or finished[c.index]
    ref = llm.chat(CHAT, SamplingParams(n=2, **params), use_tqdm=False)[0].outputs
    assert texts == [r.text for r in ref] and finished == ["length", "length"]
    assert order[:2] == [0, 1] and set(order) == {0, 1}


def test_stop(client, llm):
    cases = [
        dict(stop=["cc"]),
        dict(stop="cc", include_stop_str_in_output=True),
        dict(stop_token_ids=[102]),  # "c" in the byte tokenizer
        dict(stop=["c"], min_tokens=3),
    ]
    for extra in cases:
        kw = dict(max_tokens=10, temperature=0, **extra)
        body = {k: v for k, v in kw.items() if k in ("max_tokens", "temperature", "stop")}
        res = client.completions.create(
            model=MODEL, prompt="abc", **body, extra_body={k: v for k, v in kw.items() if k not in body}
        )
        ref = _reference(llm, "abc", **kw)[0]
        assert res.choices[0].finish_reason == ref.finish_reason == "stop", extra
        assert res.choices[0].text == ref.text, extra
        assert res.choices[0].model_extra["stop_reason"] == ref.stop_reason, extra


def test_logit_bias_and_allowed_token_ids(client, llm):
    # OpenAI's logit_bias (string keys in JSON) and vLLM's allowed_token_ids, against the offline API
    res = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=6, temperature=0, logit_bias={"100": 100}
    )
    ref = _reference(llm, "abc", max_tokens=6, temperature=0, logit_bias={100: 100})[0]
    assert ref.token_ids == [100] * 6 and res.choices[0].text == ref.text
    res = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        temperature=1.0,
        seed=5,
        extra_body={"allowed_token_ids": [104, 105]},
    )
    ref = llm.chat(
        CHAT,
        SamplingParams(max_tokens=8, temperature=1.0, seed=5, allowed_token_ids=[104, 105]),
        use_tqdm=False,
    )
    assert res.choices[0].message.content == ref[0].outputs[0].text
    assert set(ref[0].outputs[0].token_ids) <= {104, 105}


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}},
    "required": ["ok", "tag"],
    "additionalProperties": False,
}


def test_structured_outputs(client, llm):
    """OpenAI's response_format, vLLM's structured_outputs and guided_* extras, against the offline API."""
    from hopperllm import StructuredOutputsParams

    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    res = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=40,
        temperature=1.0,
        seed=11,
        extra_body={"response_format": fmt},
    )
    ref = _reference(
        llm,
        "abc",
        max_tokens=40,
        temperature=1.0,
        seed=11,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )[0]
    assert res.choices[0].text == ref.text and res.choices[0].finish_reason == ref.finish_reason

    so = {"json": SCHEMA, "disable_any_whitespace": True}
    res = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=40, temperature=0, extra_body={"structured_outputs": so}
    )
    ref = _reference(
        llm,
        "abc",
        max_tokens=40,
        temperature=0,
        structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
    )[0]
    assert res.choices[0].text == ref.text and res.choices[0].finish_reason == "stop"
    obj = json.loads(res.choices[0].text)
    assert set(obj) == {"ok", "tag"} and isinstance(obj["ok"], bool) and obj["tag"] in ("red", "green")

    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        temperature=1.0,
        seed=2,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert chat.choices[0].message.content in ("yes", "no") and chat.choices[0].finish_reason == "stop"
    res = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=12,
        temperature=0,
        extra_body={"guided_regex": "[0-9]{3}-[a-c]+"},
    )
    assert re.fullmatch("[0-9]{3}-[a-c]+", res.choices[0].text), res.choices[0].text


def test_bad_words_and_truncate_prompt_tokens(client, llm):
    """vLLM's bad_words and truncate_prompt_tokens extras, against the offline API."""
    kw = dict(max_tokens=8, temperature=0, ignore_eos=True)
    free = _reference(llm, PROMPTS[2], **kw)[0]
    word = free.text[2:4]
    res = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[2],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "bad_words": [word]},
    )
    ref = _reference(llm, PROMPTS[2], bad_words=[word], **kw)[0]
    assert res.choices[0].text == ref.text and word not in ref.text
    res = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[2],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "truncate_prompt_tokens": 5},
    )
    ids = llm.get_tokenizer().encode(PROMPTS[2])[-5:]
    ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    assert res.choices[0].text == ref.text and res.usage.prompt_tokens == 5


def test_continue_final_message(shared_server, llm):
    """vLLM's continue_final_message: the last message stays open; the output continues it."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    body = {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 5}
    r = httpx.post(
        f"{shared_server.base_url}/v1/chat/completions",
        json={**body, "temperature": 0},
        headers=shared_server.auth,
    )
    assert r.status_code == 200, r.text
    ref = llm.chat(
        msgs,
        SamplingParams(max_tokens=5, temperature=0),
        add_generation_prompt=False,
        continue_final_message=True,
        use_tqdm=False,
    )[0]
    assert r.json()["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert llm.get_tokenizer().decode(ref.prompt_token_ids).endswith("Sure, ")
    bad = httpx.post(
        f"{shared_server.base_url}/v1/chat/completions",
        json={**body, "add_generation_prompt": True},
        headers=shared_server.auth,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_beam_search(client, llm):
    """vLLM's use_beam_search: n beams, the n best returned, as LLM.beam_search finds them."""
    from hopperllm.sampling_params import BeamSearchParams

    res = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=5, n=3, extra_body={"use_beam_search": True, "ignore_eos": True}
    )
    ref = llm.beam_search(["abc"], BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))[0].sequences
    n = len(llm.get_tokenizer().encode("abc"))
    assert [c.text for c in res.choices] == [llm.get_tokenizer().decode(b.tokens[n:]) for b in ref]
    assert [c.finish_reason for c in res.choices] == ["length"] * 3 and res.usage.completion_tokens == 15
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        extra_body={"use_beam_search": True},
    )
    assert len(chat.choices) == 2 and all(c.message.content is not None for c in chat.choices)


def test_echo_with_logprobs_gives_the_prompt_logprobs(client, llm, shared_server):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 1. The prompt tokens come first (the
    first without logprobs), each with the logprob the model gives it after the tokens before, then the
    generated one; streamed the same."""
    prompt = "The quick brown fox"
    res = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True
    )
    ids = llm.get_tokenizer().encode(prompt)
    ref = llm.generate(
        prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=2, prompt_logprobs=2), use_tqdm=False
    )[0]
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and res.choices[0].text == prompt + ref.outputs[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    exact = llm.engine.executor.runner.logits_for_tokens(ids).log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(exact[i - 1, ids[i]]), abs=1e-4)
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-4)
        assert 2 <= len(lp.top_logprobs[i]) <= 3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[-1] == pytest.approx(
        ref.outputs[0].logprobs[0][ref.outputs[0].token_ids[0]], abs=1e-4
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True, stream=True
        )
    )
    streamed = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_vllm_prompt_logprobs(client, llm, shared_server):
    """vLLM's prompt_logprobs extra: per prompt token {token id: {logprob, rank, decoded_token}} (first None),
    on each completion choice and on the chat response; not with stream=true."""
    prompt = "Once upon a time"
    ids = llm.get_tokenizer().encode(prompt)
    ref = llm.generate(
        prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2), use_tqdm=False
    )[0]
    res = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    pl = res.choices[0].model_extra["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    for i in range(1, len(ids)):
        entry = {int(t): v for t, v in pl[i].items()}
        assert entry[ids[i]]["logprob"] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-4)
        ranks = sorted(v["rank"] for t, v in entry.items() if t != ids[i] or v["rank"] is not None)
        assert ranks[:2] == [1, 2] and all(v["decoded_token"] is not None for v in entry.values())
        best = max(ref.prompt_logprobs[i].items(), key=lambda kv: kv[1])[0]
        assert entry[best]["rank"] == 1
    chat = httpx.post(
        f"{shared_server.base_url}/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 0},
        headers=shared_server.auth,
    ).json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    r = httpx.post(
        f"{shared_server.base_url}/v1/completions",
        json={"prompt": prompt, "max_tokens": 2, "prompt_logprobs": 1, "stream": True},
        headers=shared_server.auth,
    )
    _assert_error(r, 400, "prompt_logprobs")


def test_logprobs(client, llm):
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    ref = _reference(llm, PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)[0]
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == res.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for got, tid, entry in zip(lp.token_logprobs, ref.token_ids, ref.logprobs, strict=True):
        assert got == pytest.approx(entry[tid], abs=1e-4)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, stream=True
    )
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    # vLLM's return_tokens_as_token_ids: "token_id:N" for every token named in the logprobs
    res = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = res.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ref.token_ids]
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    assert all(c.token.startswith("token_id:") for c in chat.choices[0].logprobs.content)


# -- errors --------------------------------------------------------------------------------------
def _assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["object"] == "error"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def test_auth(shared_server):
    url = f"{shared_server.base_url}/v1/completions"
    body = {"prompt": "abc", "max_tokens": 2}
    err = _assert_error(httpx.post(url, json=body), 401)
    assert err["type"] == "AuthenticationError"
    _assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.post(url, json=body, headers={"Authorization": shared_server.api_key}), 401)
    _assert_error(httpx.get(f"{shared_server.base_url}/v1/models"), 401)
    assert httpx.post(url, json=body, headers=shared_server.auth).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{shared_server.base_url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{shared_server.base_url}/metrics").status_code == 200


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "abc", "temperature": "hot"}, "temperature"),
    ({"prompt": "abc", "temperature": -1}, None),
    ({"prompt": "abc", "top_p": 0}, None),
    ({"prompt": "abc", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "abc", "max_tokens": 100}, "max_tokens"),  # 4 + 100 > max_model_len 64
    ({"prompt": "x" * 80}, "prompt"),
    ({"prompt": [5, 6, 100000]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "abc", "n": 0}, "n"),
    ({"prompt": "abc", "n": 1000}, "n"),
    ({"prompt": "abc", "seed": 2**70}, "seed"),
    ({"prompt": "abc", "logprobs": 21}, "logprobs"),
    ({"prompt": "abc", "stop": [""]}, None),
    ({"prompt": "abc", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "abc", "min_tokens": 20, "max_tokens": 5}, None),
    ({"prompt": "abc", "presence_penalty": 3}, None),
    ({"prompt": "abc", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "abc", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "abc", "logit_bias": {"100000": 1}}, "logit_bias"),
    ({"prompt": "abc", "logit_bias": {"5": "high"}}, "logit_bias"),
    ({"prompt": "abc", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "abc", "allowed_token_ids": [100000]}, "allowed_token_ids"),
    ({"prompt": "abc", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "abc", "use_beam_search": True, "stream": True}, "stream"),
    ({"prompt": "abc", "use_beam_search": True, "n": 11}, "n"),
    ({"prompt": "abc", "use_beam_search": True, "guided_regex": "a+"}, "guided_regex"),
    ({"prompt": "abc", "suffix": "xyz"}, "suffix"),
    ({"prompt": "abc", "priority": 1}, "priority"),  # the shared server schedules fcfs
    ({"prompt": "abc", "priority": 1.5}, "priority"),
    ({"prompt": "abc", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"prompt": "abc", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": "abc", "bad_words": [""]}, "bad_words"),
    ({"prompt": "abc", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "abc", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "abc", "guided_choice": ["a"], "guided_regex": "a"}, "guided_regex"),
    ({"prompt": "abc", "guided_choice": []}, "guided_choice"),
    ({"prompt": "abc", "structured_outputs": {}}, "structured_outputs"),
    ({"prompt": "abc", "guided_regex": "(("}, "guided_regex"),
    ({"prompt": "abc", "guided_json": '{"type": "strng"}'}, "guided_json"),
    (
        {"prompt": "abc", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
        "response_format",
    ),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_is_400(shared_server, body, param):
    r = httpx.post(f"{shared_server.base_url}/v1/completions", json=body, headers=shared_server.auth)
    err = _assert_error(r, 400, param)
    assert err["type"] == "BadRequestError"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
        ),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"messages": CHAT, "max_completion_tokens": 1000}, "max_tokens"),
        ({"messages": CHAT, "priority": -1}, "priority"),
        ({"messages": [{"role": "user", "content": "x" * 100}]}, "messages"),
    ],
)
def test_bad_chat_is_400(shared_server, body, param):
    r = httpx.post(f"{shared_server.base_url}/v1/chat/completions", json=body, headers=shared_server.auth)
    _assert_error(r, 400, param)


def test_malformed_bodies_are_400(shared_server):
    url = f"{shared_server.base_url}/v1/completions"
    h = {**shared_server.auth, "content-type": "application/json"}
    for raw in [
        b"{",
        b"[]",
        b'"abc"',
        b"null",
        b'{"prompt": "abc", "temperature": NaN}',
        b'{"prompt": "a", "top_p": Infinity}',
        b"\xff\xfe",
    ]:
        _assert_error(httpx.post(url, content=raw, headers=h), 400)
    _assert_error(
        httpx.post(url, content=b"prompt=abc", headers={**shared_server.auth, "content-type": "text/plain"}),
        400,
    )


def test_unknown_model_route_and_method(shared_server, client):
    auth = shared_server.auth
    err = _assert_error(
        httpx.post(
            f"{shared_server.base_url}/v1/completions", json={"model": "gpt-4", "prompt": "a"}, headers=auth
        ),
        404,
        "model",
    )
    assert err["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    _assert_error(httpx.get(f"{shared_server.base_url}/v1/nothing", headers=auth), 404)
    _assert_error(httpx.get(f"{shared_server.base_url}/v1/completions", headers=auth), 405)
    _assert_error(httpx.delete(f"{shared_server.base_url}/health"), 405)


def test_body_over_limit_is_413(shared_server):
    url = f"{shared_server.base_url}/v1/completions"
    big = json.dumps({"prompt": "a" * ((1 << 20) + 10)}).encode()
    err = _assert_error(
        httpx.post(url, content=big, headers={**shared_server.auth, "content-type": "application/json"}), 413
    )
    assert err["type"] == "RequestTooLargeError"

    def chunked():  # no Content-Length: the limit is enforced on the bytes as they arrive
        for i in range(0, len(big), 256 << 10):
            yield big[i : i + (256 << 10)]

    _assert_error(
        httpx.post(
            url, content=chunked(), headers={**shared_server.auth, "content-type": "application/json"}
        ),
        413,
    )
    assert httpx.get(f"{shared_server.base_url}/health").status_code == 200


def test_extra_fields_are_ignored(shared_server):
    body = {"prompt": "abc", "max_tokens": 2, "logit_bias": {"5": 1}, "frobnicate": [1, 2], "user": "u1"}
    assert (
        httpx.post(
            f"{shared_server.base_url}/v1/completions", json=body, headers=shared_server.auth
        ).status_code
        == 200
    )


# -- load: many concurrent streams, and clients that leave ---------------------------------------
async def _stream_completion(
    client: httpx.AsyncClient, url: str, i: int, max_tokens: int, leave_after: int | None
):
    body = {
        "prompt": f"request {i}",
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
        "stream": True,
        "ignore_eos": True,
    }
    events = []
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            if leave_after is not None and len(events) >= leave_after:
                return events  # leaving the block closes the connection mid-stream
    return events


def _run_clients(server, n: int, max_tokens: int, leave_after: int | None) -> list:
    async def main():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=server.auth, timeout=120, limits=limits) as c:
            url = f"{server.base_url}/v1/completions"
            return await asyncio.gather(
                *(_stream_completion(c, url, i, max_tokens, leave_after) for i in range(n)),
                return_exceptions=True,
            )

    return asyncio.run(main())


def test_concurrent_streams_then_disconnects_free_blocks(shared_server):
    before = wait_for_idle(shared_server.base_url)
    t0 = time.perf_counter()
    results = _run_clients(shared_server, 200, max_tokens=8, leave_after=None)
    elapsed = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    for events in results:
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finals[-1] == "length"
    after = wait_for_idle(shared_server.base_url)
    ok = metric(after, "vllm:request_success_total", finished_reason="length") - metric(
        before, "vllm:request_success_total", finished_reason="length"
    )
    assert ok == 200
    assert (
        metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 1600
    )
    print(f"200 concurrent streams of 8 tokens in {elapsed:.1f} s")

    # 50 clients that read one event of a long stream and hang up: their requests are aborted
    results = _run_clients(shared_server, 50, max_tokens=50, leave_after=1)
    assert not [r for r in results if isinstance(r, BaseException)]
    final = wait_for_idle(shared_server.base_url)
    aborted = metric(final, "vllm:request_success_total", finished_reason="abort") - metric(
        after, "vllm:request_success_total", finished_reason="abort"
    )
    assert aborted == 50
    generated = metric(final, "vllm:generation_tokens_total") - metric(after, "vllm:generation_tokens_total")
    assert generated < 50 * 50 / 2, "the disconnected requests ran on"
    assert metric(final, "vllm:kv_cache_usage_perc") == 0.0
    assert metric(final, "vllm:time_to_first_token_seconds_count") >= 250
    assert httpx.get(f"{shared_server.base_url}/health").status_code == 200
