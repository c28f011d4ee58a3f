"""--enable-responses-store (vLLM's VLLM_ENABLE_RESPONSES_API_STORE): /v1/responses answers kept in memory for
`previous_response_id` (the earlier turns, the new turn's instructions only) and GET / DELETE
/v1/responses/{id}; `store: false` keeps one out; the least recently used go beyond --max-stored-responses.
Without the store, previous_response_id is a 400 and the routes 404."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.entrypoints.openai_utils import ThreadServer

MODEL = "dummy:tiny"
GREEDY = dict(max_output_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def server():
    with ThreadServer(engine_kwargs=dict(max_model_len=256), max_stored_responses=3) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def _chat_answer(server, messages) -> tuple[str, int]:
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    return r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"]


def _streamed(server, body: dict) -> dict:
    final = None
    with httpx.stream(
        "POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event["type"] in ("response.completed", "response.incomplete"):
                    final = event["response"]
    return final


def test_previous_response_id_continues_the_conversation(server, client):
    body = {"input": "hi", "instructions": "Be brief.", **GREEDY}
    posted = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60).json()
    assert posted["store"] and posted["previous_response_id"] is None
    assert httpx.get(f"{server.base_url}/v1/responses/{posted['id']}").json() == posted  # as it was answered
    r1 = client.responses.retrieve(posted["id"])  # the official client reads it back
    assert r1.output_text == posted["output"][0]["content"][0]["text"]
    # the second turn: the first's input and answer, not its instructions, then the new input
    r2 = client.responses.create(model=MODEL, input="and then?", previous_response_id=r1.id, **GREEDY)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1.output_text}]
    text, prompt_tokens = _chat_answer(server, [*history, {"role": "user", "content": "and then?"}])
    assert (r2.output_text, r2.usage.input_tokens) == (text, prompt_tokens)
    assert r2.previous_response_id == r1.id
    # a streamed third turn is stored too, and chains on
    r3 = _streamed(server, {"input": "more", "previous_response_id": r2.id, **GREEDY})
    history += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": r2.output_text}]
    text, prompt_tokens = _chat_answer(server, [*history, {"role": "user", "content": "more"}])
    assert (r3["output"][0]["content"][0]["text"], r3["usage"]["input_tokens"]) == (text, prompt_tokens)
    assert httpx.get(f"{server.base_url}/v1/responses/{r3['id']}").json()["id"] == r3["id"]


def test_store_false_delete_unknown_and_eviction(server, client):
    kept = client.responses.create(model=MODEL, input="keep me", **GREEDY)
    not_kept = client.responses.create(model=MODEL, input="forget me", store=False, **GREEDY)
    assert not not_kept.store
    assert httpx.get(f"{server.base_url}/v1/responses/{not_kept.id}").status_code == 404
    r = httpx.post(
        f"{server.base_url}/v1/responses", json={"input": "x", "previous_response_id": "resp_nope"}
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    gone = httpx.delete(f"{server.base_url}/v1/responses/{kept.id}")
    assert gone.json() == {"id": kept.id, "object": "response", "deleted": True}
    assert httpx.get(f"{server.base_url}/v1/responses/{kept.id}").status_code == 404
    assert httpx.delete(f"{server.base_url}/v1/responses/{kept.id}").status_code == 404
    # room for three: a fourth pushes out the least recently used
    ids = [client.responses.create(model=MODEL, input=f"n{i}", **GREEDY).id for i in range(3)]
    httpx.get(f"{server.base_url}/v1/responses/{ids[0]}")  # used: now the most recent
    ids.append(client.responses.create(model=MODEL, input="n3", **GREEDY).id)
    status = {i: httpx.get(f"{server.base_url}/v1/responses/{i}").status_code for i in ids}
    assert status == {ids[0]: 200, ids[1]: 404, ids[2]: 200, ids[3]: 200}


def test_without_the_store(shared_server):
    r = httpx.post(
        f"{shared_server.base_url}/v1/responses",
        json={"input": "hi", "previous_response_id": "resp_1"},
        headers=shared_server.auth,
    )
    assert r.status_code == 400 and "--enable-responses-store" in r.json()["error"]["message"]
    r = httpx.get(f"{shared_server.base_url}/v1/responses/resp_1", headers=shared_server.auth)
    assert r.status_code == 404 and r.json()["error"]["message"]
