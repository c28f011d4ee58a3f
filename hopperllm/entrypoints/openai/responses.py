"""OpenAI's Responses API (/v1/responses) over the chat path, as vLLM serves it.

A request becomes a chat request: `instructions` a system message first, `input` (a string, or items: messages
whose content is text or input_text / output_text parts, the developer role the system's; `function_call`
items, the model's earlier calls, as assistant tool calls; `function_call_output` items as tool messages) the
conversation, `max_output_tokens` the token limit, `text.format` (or vLLM's `structured_outputs`) the
structured-output constraint, function `tools` and `tool_choice` the chat endpoint's (the same rules: "auto"
needs --enable-auto-tool-choice and a --tool-call-parser; "required" and a named function constrain the output).
The answer is a `message` output item (with --reasoning-parser, a `reasoning` item before it) and a
`function_call` item per tool call; streamed, the Responses events in OpenAI's order (created, in_progress,
output_item.added, content_part.added, output_text.delta ..., output_text.done, content_part.done,
output_item.done; for a call output_item.added, function_call_arguments.delta ..., .done, output_item.done;
then completed, or incomplete when max_output_tokens cut the answer). With --enable-responses-store (vLLM's
VLLM_ENABLE_RESPONSES_API_STORE) answers are kept (ResponseStore) for `previous_response_id` and GET / DELETE
/v1/responses/{id}; without it `store` is answered false and `previous_response_id` is refused, as vLLM does.
Tools other than functions (web search, file search, ...) are refused.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any

from pydantic import ValidationError

from hopperllm.entrypoints.openai.protocol import ChatCompletionRequest, ResponsesRequest, UsageInfo

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesInputError(ValueError):
    """A request this endpoint cannot serve; `param` names the field (an HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseStore:
    """Responses kept for `previous_response_id` and GET / DELETE /v1/responses/{id} (--enable-responses-store,
    as vLLM's VLLM_ENABLE_RESPONSES_API_STORE): each response's body and its conversation (the chat messages
    of every turn so far, instructions left out, ending with the response's own answer), in memory, the
    least recently used dropped beyond `max_size`."""

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"the response store needs room for at least one response, got {max_size}")
        self.max_size = max_size
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        item = self._items.get(response_id)
        if item is not None:
            self._items.move_to_end(response_id)
        return item

    def put(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self._items[body["id"]] = (body, conversation)
        self._items.move_to_end(body["id"])
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def conversation_after(
    req: ResponsesRequest, chat: ChatCompletionRequest, output: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A finished response's conversation: its chat messages but the instructions (the first message, when
    given: a new turn brings its own), then its answer as an assistant message (text and tool calls;
    reasoning left out)."""
    messages = [m.model_dump(exclude_none=True) for m in chat.messages[1 if req.instructions else 0 :]]
    text = "".join(p["text"] for o in output if o["type"] == "message" for p in o["content"])
    calls = [
        {"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
        for o in output
        if o["type"] == "function_call"
    ]
    answer: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        answer["tool_calls"] = calls
    return [*messages, answer]


def to_chat_request(
    req: ResponsesRequest, history: list[dict[str, Any]] | None = None
) -> ChatCompletionRequest:
    """The chat request that computes the response (ResponsesInputError for what it cannot carry);
    `history`: the conversation of the response `previous_response_id` names (None: no store)."""
    if req.previous_response_id is not None and history is None:
        raise ResponsesInputError(
            "this server stores no responses (start it with --enable-responses-store): send the whole "
            "conversation in `input` instead of previous_response_id",
            "previous_response_id",
        )
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages += history or []
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            if item.type == "function_call":
                call = _function_call(item, i)
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                    last["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item.type == "function_call_output":
                messages.append(_function_output(item, i))
            else:
                messages.append(_message(item, i))
    body: dict[str, Any] = {
        "messages": messages,
        "tools": _chat_tools(req.tools),
        "tool_choice": _chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "priority": req.priority,
        "structured_outputs": (
            req.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            if req.structured_outputs
            else None
        ),
    }
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ResponsesInputError("text.format of type json_schema needs a schema", "text")
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.json_schema, "strict": fmt.strict},
        }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise ResponsesInputError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", "input") from None


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools ({type, name, description, parameters, strict}) as chat tools."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise ResponsesInputError(
                f"tools[{i}]: tools of type {tool.get('type')!r} are not served: only function tools", "tools"
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ResponsesInputError(f"tools[{i}]: a function tool needs a name", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    """Responses' tool_choice ("auto", "none", "required", {"type": "function", "name": ...}) as chat's."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ResponsesInputError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', "tool_choice"
    )


def _item_field(item, name: str, i: int) -> str:
    value = getattr(item, name, None)
    if value is None and item.model_extra:
        value = item.model_extra.get(name)
    if not isinstance(value, str):
        raise ResponsesInputError(f"input[{i}]: a {item.type} item needs a string {name!r}", "input")
    return value


def _function_call(item, i: int) -> dict[str, Any]:
    """An earlier function_call output item as a chat tool call."""
    return {
        "id": _item_field(item, "call_id", i),
        "type": "function",
        "function": {"name": _item_field(item, "name", i), "arguments": _item_field(item, "arguments", i)},
    }


def _function_output(item, i: int) -> dict[str, Any]:
    """A function_call_output item as the chat tool message answering its call."""
    return {
        "role": "tool",
        "tool_call_id": _item_field(item, "call_id", i),
        "content": _item_field(item, "output", i),
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_tools(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's tools as a response echoes them."""
    return [
        {"type": "function", "name": t["name"], "description": t.get("description"),
         "parameters": t.get("parameters"), "strict": t.get("strict")}
        for t in req.tools or ()
    ]  # fmt: skip


def _message(item, i: int) -> dict[str, Any]:
    if item.type != "message":
        raise ResponsesInputError(
            f"input[{i}]: items of type {item.type!r} are not served here: send messages, function_call and "
            "function_call_output items",
            "input",
        )
    role = ROLES.get(item.role or "")
    if role is None:
        raise ResponsesInputError(
            f"input[{i}]: role must be one of {', '.join(ROLES)}, got {item.role!r}", "input"
        )
    content = item.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type not in TEXT_PARTS or part.text is None:
                raise ResponsesInputError(
                    f"input[{i}]: content of type {part.type!r} is not supported: send input_text parts",
                    "input",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    if content is None:
        raise ResponsesInputError(f"input[{i}]: a message needs content", "input")
    return {"role": role, "content": content}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [text_part(text)] if status == "completed" or text else [],
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def usage(u: UsageInfo) -> dict[str, Any]:
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details is not None else 0
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached or 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


def response_object(
    req: ResponsesRequest,
    response_id: str,
    model: str,
    created: int,
    *,
    status: str,
    output: list[dict[str, Any]],
    temperature: float,
    top_p: float,
    usage_info: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    store: bool = False,
) -> dict[str, Any]:
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    text_format: dict[str, Any] = {"type": fmt.type if fmt is not None else "text"}
    if fmt is not None and fmt.type == "json_schema":
        text_format.update(name=fmt.name, schema=fmt.json_schema, strict=fmt.strict)
    if status == "completed" and finish_reason == "length":
        status = "incomplete"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False and bool(req.tools),
        "previous_response_id": req.previous_response_id,
        "reasoning": None,
        "store": store,
        "temperature": temperature,
        "top_p": top_p,
        "text": {"format": text_format},
        "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
        "tools": response_tools(req),
        "truncation": "disabled",
        "usage": usage_info,
        "user": req.user,
    }


class EventWriter:
    """Server-sent Responses events: `event: <type>` and `data: <json>` with a running sequence_number."""

    def __init__(self):
        self.seq = 0

    def __call__(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(data)}\n\n"
