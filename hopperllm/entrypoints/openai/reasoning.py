"""Reasoning parsers for /v1/chat/completions (vLLM's --reasoning-parser): the model's thinking goes to the
message's `reasoning_content`, the answer after it to `content`.

deepseek_r1 (DeepSeek-R1 and its Llama distills, whose chat template opens the <think> block itself): the
output up to </think> is reasoning (a leading <think> is dropped); without </think> it is all reasoning.
"""

from __future__ import annotations


class ReasoningParser:
    name = ""
    start = "<think>"
    end = "</think>"

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a finished output; an empty part is None."""
        head, sep, tail = text.partition(self.start)
        body = tail if sep else head
        if self.end not in body:
            return (body or None), None
        reasoning, _, content = body.partition(self.end)
        return (reasoning or None), (content or None)

    def split_stream(self, text: str, done: bool) -> tuple[str, str]:
        """(reasoning, content) of an output so far, each safe to send: a tail that may still become a
        <think> or </think> marker is held back until the next token or the end."""
        if not done and self.start.startswith(text):
            return "", ""  # may still be the opening marker
        head, sep, tail = text.partition(self.start)
        body = tail if sep else head
        if self.end in body:
            reasoning, _, content = body.partition(self.end)
            return reasoning, content
        if not done:
            keep = max((k for k in range(1, len(self.end)) if body.endswith(self.end[:k])), default=0)
            body = body[: len(body) - keep]
        return body, ""


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1ReasoningParser,)}
