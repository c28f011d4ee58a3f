"""OpenAI's Responses API (/v1/responses) on the shared server, through the official `openai` client:
the answer must equal the offline `LLM.chat` for the same conversation, streamed or not."""

from __future__ import annotations

import json

import httpx
import pytest

from hopperllm import LLM, SamplingParams

MODEL = "dummy:tiny"


def _chat(llm: LLM, messages, **params):
    return llm.chat(messages, SamplingParams(**params), use_tqdm=False)[0]


def test_response_equals_llm_chat(client, llm):
    res = client.responses.create(
        model=MODEL, input="2+2?", instructions="Hi", max_output_tokens=10, temperature=0
    )
    ref = _chat(llm, [{"role": "system", "content": "Hi"}, {"role": "user", "content": "2+2?"}], max_tokens=10,
                temperature=0)  # fmt: skip
    assert res.object == "response" and res.id.startswith("resp_") and res.model == MODEL
    assert res.output_text == ref.outputs[0].text
    [item] = res.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert res.usage.input_tokens == len(ref.prompt_token_ids)
    assert res.usage.output_tokens == len(ref.outputs[0].token_ids)
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens
    assert res.store is False and res.instructions == "Hi"
    want = "incomplete" if ref.outputs[0].finish_reason == "length" else "completed"
    assert res.status == want
    if want == "incomplete":
        assert res.incomplete_details.reason == "max_output_tokens"

    # messages with input_text parts, the developer role as the system's, a seeded sample
    conv = [
        {"role": "developer", "content": "Be brief"},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Say"}, {"type": "input_text", "text": "hi"}],
        },
    ]
    res = client.responses.create(
        model=MODEL, input=conv, max_output_tokens=8, temperature=0.8, extra_body={"seed": 5}
    )
    ref = _chat(llm, [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say\nhi"}],
                max_tokens=8, temperature=0.8, seed=5)  # fmt: skip
    assert res.output_text == ref.outputs[0].text


def test_streamed_response_events(client, llm):
    events = list(
        client.responses.create(
            model=MODEL, input="Once upon", max_output_tokens=6, temperature=0, stream=True
        )
    )
    ref = _chat(llm, [{"role": "user", "content": "Once upon"}], max_tokens=6, temperature=0)
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == ref.outputs[0].text == events[-4].text
    final = events[-1].response
    assert final.output_text == deltas and final.usage.output_tokens == len(ref.outputs[0].token_ids)
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


def test_text_format_json_object(client):
    pytest.importorskip("llguidance")
    res = client.responses.create(
        model=MODEL,
        input="JSON please",
        max_output_tokens=20,
        temperature=0,
        text={"format": {"type": "json_object"}},
    )
    if res.status == "completed":
        assert isinstance(json.loads(res.output_text), dict)
    else:  # cut by max_output_tokens: still a prefix of a JSON object
        assert res.output_text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
        # tool_choice "auto" (the default with tools) needs --enable-auto-tool-choice, as on the chat endpoint
        ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, 400, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text"),
        ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "x " * 80}, 400, "input"),
        ({}, 400, "input"),
        ({"input": "hi", "model": "other"}, 404, "model"),
    ],
)
def test_bad_responses_are_openai_errors(shared_server, body, status, param):
    r = httpx.post(f"{shared_server.base_url}/v1/responses", json=body, headers=shared_server.auth)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status and err["message"]
