"""Tool calling in /v1/chat/completions, as vLLM serves it.

- `tools` reach the chat template (Llama 3.1's and Hermes-style templates render them).
- `tool_choice` {"type": "function", "function": {"name": N}}: the output is constrained (structured
  outputs) to JSON that follows N's parameter schema and is returned as one call of N.
- `tool_choice` "required": the output is constrained to a JSON array of {"name", "parameters"} objects,
  one of the tools each, returned as calls (finish reason "tool_calls").
- `tool_choice` "auto" (the default when `tools` are given): free output, which the server's
  `--tool-call-parser` reads for calls; it needs `--enable-auto-tool-choice`, as in vLLM.
- `tool_choice` "none": no calls; the tools still reach the template.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _parameters(tool) -> dict:
    return (
        tool.function.parameters
        if tool.function.parameters is not None
        else {"type": "object", "properties": {}}
    )


def named_tool_schema(tools, name: str) -> dict:
    return next(_parameters(t) for t in tools if t.function.name == name)


def required_tools_schema(tools) -> dict:
    """A JSON array of at least one call, each {"name": one tool's name, "parameters": its schema}."""
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _parameters(t),
                    },
                    "required": ["name", "parameters"],
                }
                for t in tools
            ],
        },
    }


def parse_required_calls(text: str) -> list[ParsedCall] | None:
    """The calls of a "required" output (a JSON array), or None when it does not parse (cut by max_tokens)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list):
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(ParsedCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


# -- parsers for tool_choice "auto" --------------------------------------------------------------------
class ToolParser:
    """Finds tool calls in a free output. Streaming: text before `start` streams as content; from the
    first `start` on (or from the first character, for `leading` parsers) the rest is held and parsed
    when the choice ends."""

    name: str = ""
    starts: tuple[str, ...] = ()
    leading: bool = False  # calls can only open the output (after whitespace)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls); no calls: (text, [])."""
        raise NotImplementedError

    def split_stream(self, text: str, done: bool) -> tuple[int, bool]:
        """How much of the output so far is safe to stream as content, and whether a call has begun."""
        if self.leading:
            body = text.lstrip()
            if not body:
                return (len(text) if done else 0), False
            if any(body.startswith(s) or s.startswith(body) for s in self.starts):
                return 0, True  # a call (or what may still become one): hold it all
            return len(text), False
        at = min((i for i in (text.find(s) for s in self.starts) if i >= 0), default=-1)
        if at >= 0:
            return at, True
        if done:
            return len(text), False
        # hold back a tail that may be the start of a marker
        keep = max((k for s in self.starts for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - keep, False


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2's JSON calls: `{"name": ..., "parameters": {...}}`, several joined by ';', optionally
    after <|python_tag|> (vLLM's llama3_json)."""

    name = "llama3_json"
    starts = ("<|python_tag|>", "{")
    leading = True

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>") :].strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls, i = [], 0
        while i < len(body):
            try:
                obj, end = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            args = obj.get("parameters", obj.get("arguments", {}))
            calls.append(ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False)))
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return None, calls


class HermesToolParser(ToolParser):
    """Hermes / Qwen-style calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (vLLM's hermes)."""

    name = "hermes"
    starts = ("<tool_call>",)
    _call = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find("<tool_call>")
        if at < 0:
            return text, []
        calls = []
        for m in self._call.finditer(text, at):
            try:
                obj = json.loads(m.group(1).strip())
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(ParsedCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
        content = text[:at]
        return (content if content.strip() else None), calls


class PythonicToolParser(ToolParser):
    """Llama 3.2 / Llama 4 pythonic calls: the whole output a Python list of calls with literal keyword
    arguments, `[get_weather(city="Paris", days=2), get_time()]`, optionally inside <|python_start|> ...
    <|python_end|> (vLLM's pythonic and llama4_pythonic)."""

    name = "pythonic"
    starts = ("<|python_start|>", "[")
    leading = True

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        import ast

        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
        except SyntaxError:
            return text, []
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                return text, []
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
            except ValueError:
                return text, []
            calls.append(ParsedCall(call.func.id, json.dumps(args, ensure_ascii=False)))
        return None, calls


class Llama4PythonicToolParser(PythonicToolParser):
    name = "llama4_pythonic"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (Llama3JsonToolParser, HermesToolParser, PythonicToolParser, Llama4PythonicToolParser)
}


def tools_for_template(tools) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]
