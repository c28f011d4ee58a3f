"""OpenAI's Responses API (/v1/responses) over the chat path, as vLLM serves its text part.

A request becomes a chat request: `instructions` a system message first, `input` (a string, or messages whose
content is text or input_text / output_text parts; the developer role is the system's) the conversation,
`max_output_tokens` the token limit, `text.format` (or vLLM's `structured_outputs`) the structured-output constraint. The answer is one
`message` output item (with --reasoning-parser, a `reasoning` item before it); streamed, the Responses
events in OpenAI's order (created, in_progress, output_item.added, content_part.added, output_text.delta ...,
output_text.done, content_part.done, output_item.done, then completed, or incomplete when max_output_tokens
cut the answer). Responses are not stored: `store` is answered false and `previous_response_id` is refused,
as vLLM does without its store; function tools are served on /v1/chat/completions and refused here.
"""

from __future__ import annotations

import json
import uuid
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


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that computes the response (ResponsesInputError for what it cannot carry)."""
    if req.previous_response_id is not None:
        raise ResponsesInputError(
            "this server stores no responses: send the whole conversation in `input` instead of "
            "previous_response_id",
            "previous_response_id",
        )
    if req.tools:
        raise ResponsesInputError(
            "tools are not served on /v1/responses: use /v1/chat/completions for function calling", "tools"
        )
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            messages.append(_message(item, i))
    body: dict[str, Any] = {
        "messages": messages,
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


def _message(item, i: int) -> dict[str, Any]:
    if item.type != "message":
        raise ResponsesInputError(
            f"input[{i}]: items of type {item.type!r} are not served here: send messages", "input"
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
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": temperature,
        "top_p": top_p,
        "text": {"format": text_format},
        "tool_choice": "none",
        "tools": [],
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
