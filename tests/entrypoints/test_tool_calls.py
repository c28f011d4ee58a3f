"""Tool calling in /v1/chat/completions (vLLM's rules): tools reach the chat template, a named tool or
"required" constrains the output to its calls' JSON, "auto" reads calls with the server's parser; streamed
choices add up to the non-streamed message."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from hopperllm import LLM, SamplingParams, StructuredOutputsParams
from hopperllm.entrypoints.openai.protocol import ChatCompletionRequest
from hopperllm.entrypoints.openai.serving import _ChatChoiceStream
from hopperllm.entrypoints.openai.tool_calls import (
    HermesToolParser,
    Llama3JsonToolParser,
    PythonicToolParser,
    named_tool_schema,
    parse_required_calls,
    required_tools_schema,
)
from hopperllm.outputs import CompletionOutput
from tests.entrypoints.openai_utils import ThreadServer

pytest.importorskip("llguidance")

MODEL = "dummy:tiny"
MSGS = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'


# -- parsers and the streamed choice, without a server -----------------------------------------------
def test_llama3_json_parser():
    p = Llama3JsonToolParser()
    content, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"a": 1}}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    content, calls = p.extract('{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}'), ("g", "{}")]
    assert p.extract("Hello {world}") == ("Hello {world}", [])
    assert p.extract('{"name": "f", "parameters": {"a": ') == (
        '{"name": "f", "parameters": {"a": ',
        [],
    )  # cut short
    assert p.split_stream("  ", done=False) == (0, False) and p.split_stream(" {", done=False) == (0, True)
    assert p.split_stream("Hi {", done=False) == (4, False)


def test_hermes_parser():
    p = HermesToolParser()
    content, calls = p.extract(
        "Let me look. " + HERMES_CALL + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert content == "Let me look. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}),
        ("get_time", {}),
    ]
    assert p.extract("no calls") == ("no calls", [])
    assert p.split_stream("Hello <tool", done=False) == (6, False)  # a marker's start is held back
    assert p.split_stream("Hello <tool", done=True) == (11, False)
    assert p.split_stream("Hello <tool_call>{", done=False) == (6, True)


def test_pythonic_parser():
    p = PythonicToolParser()
    content, calls = p.extract('<|python_start|>[get_weather(city="Oslo", days=2), get_time()]<|python_end|>')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}),
        ("get_time", {}),
    ]
    for text in ("[1, 2]", "Hello [x]", "[f(1)]", "[f(a=g())]", "[f(a=1"):  # not a list of literal calls
        assert p.extract(text) == (text, [])
    assert p.split_stream(" [get", done=False) == (0, True) and p.split_stream("Sure", done=False) == (
        4,
        False,
    )


def test_required_schema_and_parse():
    from hopperllm.entrypoints.openai.protocol import ChatCompletionTool

    tools = [ChatCompletionTool(**WEATHER), ChatCompletionTool(**TIME)]
    schema = required_tools_schema(tools)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert named_tool_schema(tools, "get_time") == {"type": "object", "properties": {}}
    calls = parse_required_calls('[{"name": "get_time", "parameters": {}}]')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    assert parse_required_calls('[{"name": "get_ti') is None


def _stream(mode, req, parser_cls, pieces, finish="stop"):
    s = _ChatChoiceStream(mode, req, parser_cls)
    text, deltas = "", []
    for i, piece in enumerate(pieces):
        text += piece
        last = i == len(pieces) - 1
        c = CompletionOutput(0, text, [], None, None, finish if last else None, delta_text=piece)
        deltas.append(s.step(c))
    return deltas


def test_streamed_auto_choice_adds_up():
    req = ChatCompletionRequest(model=MODEL, messages=MSGS, tools=[WEATHER])
    pieces = ["Let ", "me <to", "ol_", "call>", HERMES_CALL[len("<tool_call>") :]]
    deltas = _stream("auto", req, HermesToolParser, pieces)
    content = "".join(d.content or "" for d, _ in deltas if d is not None)
    calls = [tc for d, _ in deltas if d is not None and d.tool_calls for tc in d.tool_calls]
    assert content == "Let me " and deltas[-1][1] == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2})
    ]
    plain = _stream("auto", req, HermesToolParser, ["Hello", " <t", "here"])
    assert "".join(d.content or "" for d, _ in plain if d is not None) == "Hello <there"
    assert plain[-1][1] == "stop"


def test_streamed_named_choice_sends_the_arguments_as_they_come():
    req = ChatCompletionRequest(
        model=MODEL,
        messages=MSGS,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    deltas = _stream("named", req, None, ['{"city"', ': "Paris", ', '"days": 3}'])
    first = deltas[0][0].tool_calls[0]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert "".join(d.tool_calls[0].function.arguments for d, _ in deltas) == '{"city": "Paris", "days": 3}'
    assert all(d.tool_calls[0].id is None for d, _ in deltas[1:]) and deltas[-1][1] == "stop"


# -- a server with tool calls ("auto" through the hermes parser) -----------------------------------
@pytest.fixture(scope="module")
def server():
    with ThreadServer(
        engine_kwargs=dict(max_model_len=160), enable_auto_tool_choice=True, tool_call_parser="hermes"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=MODEL, device="cpu", max_model_len=160, show_progress=False)


def _stream_chat(client, **kw):
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or tc.id
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_named_tool_choice(client, llm):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(tools=[WEATHER], tool_choice=choice, max_tokens=60, temperature=1.0, seed=4)
    res = client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
    msg = res.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert (
        call.type == "function"
        and call.function.name == "get_weather"
        and call.id.startswith("chatcmpl-tool-")
    )
    so = StructuredOutputsParams(json=WEATHER["function"]["parameters"])
    ref = llm.chat(
        MSGS, SamplingParams(max_tokens=60, temperature=1.0, seed=4, structured_outputs=so), use_tqdm=False
    )
    assert (
        call.function.arguments == ref[0].outputs[0].text
    )  # the constrained output, as the offline API gives it
    assert res.choices[0].finish_reason == ref[0].outputs[0].finish_reason
    if res.choices[0].finish_reason == "stop":
        args = json.loads(call.function.arguments)
        assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    content, calls, finish = _stream_chat(client, **kw)
    assert content == "" and finish == res.choices[0].finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


def test_required_tool_choice(client):
    kw = dict(tools=[WEATHER, TIME], tool_choice="required", max_tokens=100, temperature=1.0, seed=9)
    res = client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
    c = res.choices[0]
    if c.finish_reason == "length":  # the array was cut short: its text comes back as content
        assert c.message.content and not c.message.tool_calls
        return
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        json.loads(call.function.arguments)
    content, calls, finish = _stream_chat(client, **kw)
    assert finish == "tool_calls"
    assert [(k["name"], k["arguments"]) for k in calls] == [
        (t.function.name, t.function.arguments) for t in c.message.tool_calls
    ]


def test_auto_tool_choice_reads_calls_with_the_parser(client):
    # the random model writes what a regex makes it write: a hermes call after some text, or plain text
    for regex, expect_calls in (
        (re.escape(f"Let me see. {HERMES_CALL}"), True),
        ("Hello", False),
    ):
        kw = dict(tools=[WEATHER], max_tokens=100, temperature=0, extra_body={"guided_regex": regex})
        res = client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
        c = res.choices[0]
        content, calls, finish = _stream_chat(client, **kw)
        if expect_calls:
            assert (
                c.finish_reason == finish == "tool_calls" and c.message.content == content == "Let me see. "
            )
            assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
                ("get_weather", {"city": "Oslo", "days": 2})
            ]
            assert [(k["name"], k["arguments"]) for k in calls] == [
                (t.function.name, t.function.arguments) for t in c.message.tool_calls
            ]
        else:
            assert c.message.content == content == "Hello" and not c.message.tool_calls and not calls
            assert c.finish_reason == finish == "stop"


def test_tools_reach_the_chat_template(server):
    template = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[-1]['content'] }}{{ flag }}"
    )
    body = {
        "messages": MSGS,
        "tools": [WEATHER, TIME],
        "tool_choice": "none",
        "chat_template_kwargs": {"flag": "!"},
    }
    server.engine.tokenizer.chat_template, old = template, server.engine.tokenizer.chat_template
    try:
        tok = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "[get_weather][get_time]hi!"}).json()
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "max_tokens": 1})
        assert (
            r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == tok["count"] - 1
        )  # no BOS in chats
    finally:
        server.engine.tokenizer.chat_template = old


@pytest.mark.parametrize(
    "body",
    [
        {"tool_choice": "required"},  # no tools
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"tools": [{"type": "function"}]},
        {"tools": [WEATHER], "tool_choice": "sometimes"},
    ],
)
def test_bad_tool_requests_are_400(server, body):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MSGS, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("tool_choice", "tools")


def test_auto_needs_the_server_flags(shared_server):
    r = httpx.post(
        f"{shared_server.base_url}/v1/chat/completions",
        json={"messages": MSGS, "tools": [WEATHER]},  # tool_choice defaults to "auto" with tools
        headers=shared_server.auth,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


# -- /v1/responses with function tools --------------------------------------------------------------
def _flat(tool: dict) -> dict:
    """A chat tool in the Responses API's flat form."""
    return {"type": "function", **tool["function"]}


def _response_stream(server, body: dict) -> tuple[list[dict], dict]:
    """The streamed events' data (in order) and the final response."""
    events = []
    with httpx.stream(
        "POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, events[-1]["response"]


def _calls_from_events(events: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) of each function_call item, from its deltas; checks each item's event order."""
    calls, open_ids = [], {}
    for e in events:
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call":
            open_ids[e["item"]["id"]] = [e["item"]["name"], ""]
        elif e["type"] == "response.function_call_arguments.delta":
            open_ids[e["item_id"]][1] += e["delta"]
        elif e["type"] == "response.function_call_arguments.done":
            assert open_ids[e["item_id"]][1] == e["arguments"]
        elif e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call":
            name, args = open_ids.pop(e["item"]["id"])
            assert (e["item"]["name"], e["item"]["arguments"], e["item"]["status"]) == (
                name,
                args,
                "completed",
            )
            calls.append((name, args))
    assert not open_ids
    return calls


def test_responses_named_function_call(server, client):
    """A named function: one function_call item whose arguments are the chat endpoint's for the same
    sampling; streamed, its arguments as deltas that add up."""
    chat = client.chat.completions.create(
        model=MODEL, messages=MSGS, tools=[WEATHER], max_tokens=60, temperature=1.0, seed=4,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).choices[0].message.tool_calls[0]  # fmt: skip
    body = {
        "input": "hi", "tools": [_flat(WEATHER)], "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 60, "temperature": 1.0, "seed": 4,
    }  # fmt: skip
    res = client.responses.create(model=MODEL, **{k: v for k, v in body.items() if k != "seed"},
                                  extra_body={"seed": 4})  # fmt: skip
    assert [o.type for o in res.output] == ["function_call"]
    call = res.output[0]
    assert (call.name, call.arguments, call.status) == ("get_weather", chat.function.arguments, "completed")
    assert call.call_id and call.id.startswith("fc_")
    assert res.tools[0].name == "get_weather" and res.tool_choice.name == "get_weather"
    events, final = _response_stream(server, body)
    assert _calls_from_events(events) == [("get_weather", chat.function.arguments)]
    assert [o["type"] for o in final["output"]] == ["function_call"]
    assert sum(e["type"] == "response.function_call_arguments.delta" for e in events) > 1  # as they come


def test_responses_auto_calls_through_the_parser(server, client):
    """ "auto" through the server's parser: the text before the call as a message item, then the call."""
    regex = re.escape(f"Let me see. {HERMES_CALL}")
    body = {"input": "hi", "tools": [_flat(WEATHER)], "max_output_tokens": 100, "temperature": 0,
            "structured_outputs": {"regex": regex}}  # fmt: skip
    res = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60).json()
    assert [o["type"] for o in res["output"]] == ["message", "function_call"]
    assert res["output"][0]["content"][0]["text"] == "Let me see. "
    fc = res["output"][1]
    assert (fc["name"], json.loads(fc["arguments"])) == ("get_weather", {"city": "Oslo", "days": 2})
    events, final = _response_stream(server, body)
    assert _calls_from_events(events) == [(fc["name"], fc["arguments"])]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Let me see. "


def test_responses_function_call_turns_reach_the_prompt(server, client):
    """An earlier call and its output, sent back as input items, are the chat endpoint's assistant tool call
    and tool message: the same prompt (tokens) and the same greedy answer."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}  # fmt: skip
    messages = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]  # fmt: skip
    chat = httpx.post(f"{server.base_url}/v1/chat/completions", json={
        "messages": messages, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8, "temperature": 0,
    }, timeout=60).json()  # fmt: skip
    res = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Oslo", "days": 2}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],  # fmt: skip
        tools=[_flat(WEATHER)], tool_choice="none", max_output_tokens=8, temperature=0,
    )  # fmt: skip
    assert res.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert res.output_text == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [_flat(WEATHER)], "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"tools": [_flat(WEATHER)], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),  # no call_id
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input"),  # no output
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ],
)
def test_bad_responses_tool_requests_are_400(server, body, param):
    r = httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- --reasoning-parser deepseek_r1 -----------------------------------------------------------------
def test_reasoning_parser_split_and_stream():
    from hopperllm.entrypoints.openai.reasoning import DeepSeekR1ReasoningParser

    p = DeepSeekR1ReasoningParser()
    assert p.split("think hard</think>The answer") == ("think hard", "The answer")
    assert p.split("<think>x</think>") == ("x", None) and p.split("still thinking") == (
        "still thinking",
        None,
    )
    req = ChatCompletionRequest(model=MODEL, messages=MSGS)
    pieces = ["<th", "ink>hmm, ", "2+2</th", "ink>", "4", "."]
    s = _ChatChoiceStream(None, req, None, DeepSeekR1ReasoningParser)
    text, reasoning, content = "", "", ""
    for i, piece in enumerate(pieces):
        text += piece
        last = i == len(pieces) - 1
        d, _ = s.step(CompletionOutput(0, text, [], None, None, "stop" if last else None, delta_text=piece))
        reasoning += (d.reasoning_content or "") if d else ""
        content += (d.content or "") if d else ""
    assert (reasoning, content) == ("hmm, 2+2", "4.")


def test_reasoning_content_in_the_server():
    regex = re.escape("Let me think.</think>It is 4.")
    body = {"messages": MSGS, "max_tokens": 40, "temperature": 0, "guided_regex": regex}
    with ThreadServer(engine_kwargs=dict(max_model_len=160), reasoning_parser="deepseek_r1") as srv:
        url = f"{srv.base_url}/v1/chat/completions"
        msg = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("Let me think.", "It is 4.")
        reasoning, content = "", ""
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        reasoning += ch["delta"].get("reasoning_content", "")
                        content += ch["delta"].get("content", "")
        assert (reasoning, content) == ("Let me think.", "It is 4.")
        # /v1/responses: a reasoning item, then the message; streamed, each item's own events
        rbody = {
            "input": MSGS,
            "max_output_tokens": 40,
            "temperature": 0,
            "structured_outputs": {"regex": regex},
        }
        res = httpx.post(f"{srv.base_url}/v1/responses", json=rbody, timeout=60).json()
        assert [i["type"] for i in res["output"]] == ["reasoning", "message"]
        assert res["output"][0]["content"][0]["text"] == "Let me think."
        assert res["output"][1]["content"][0]["text"] == "It is 4."
        events = []
        with httpx.stream(
            "POST", f"{srv.base_url}/v1/responses", json={**rbody, "stream": True}, timeout=60
        ) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        think = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert (think, answer) == ("Let me think.", "It is 4.")
        added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
        assert added == ["reasoning", "message"] and events[-1]["type"] == "response.completed"
        assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "message"]
