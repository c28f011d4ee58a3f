"""TextChunkTemplate: a streamed completion or chat chunk spliced from its template parses to the same JSON as
the pydantic-built chunk it stands for, whatever the text (quotes, escapes, control characters, non-ASCII)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hopperllm.entrypoints.openai.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionResponseChoice,
    DeltaMessage,
    TextChunkTemplate,
    TextChunkTemplates,
    sse_event,
)


def _make(idx: int, model: str):
    return lambda t: CompletionResponse(
        id="cmpl-1", created=1700000000, model=model, choices=[CompletionResponseChoice(index=idx, text=t)]
    )


def _parse(line: str) -> dict:
    assert line.startswith("data: ") and line.endswith("\n\n")
    return json.loads(line[len("data: ") : -2])


@settings(max_examples=300, deadline=None)
@given(text=st.text(), idx=st.integers(0, 7), model=st.sampled_from(["m", 'we"ird\\name', "модель"]))
def test_template_chunk_equals_pydantic_chunk(text, idx, model):
    make = _make(idx, model)
    got = TextChunkTemplate(make).render(text)
    assert _parse(got) == _parse(sse_event(make(text)))
    got.encode()


def test_the_spliced_text_is_ascii_escaped():
    """Even a lone surrogate (a str UTF-8 cannot encode) goes out: the text is json's ASCII escape."""
    got = TextChunkTemplate(_make(0, "m")).render("caf\u00e9 \ud800")
    got.encode("ascii")
    assert _parse(got)["choices"][0]["text"] == "caf\u00e9 \ud800"


def test_a_template_whose_text_is_not_in_it_once_is_refused():
    with pytest.raises(ValueError, match="exactly once"):
        TextChunkTemplate(
            lambda t: CompletionResponse(id=t, model=t, choices=[CompletionResponseChoice(index=0, text=t)])
        )


@settings(max_examples=200, deadline=None)
@given(text=st.text(), idx=st.integers(0, 7))
def test_chat_template_chunk_equals_pydantic_chunk(text, idx):
    def make(t):
        return ChatCompletionStreamResponse(
            id="chatcmpl-1",
            created=1700000000,
            model="m",
            choices=[ChatCompletionStreamChoice(index=idx, delta=DeltaMessage(content=t))],
        )

    got = TextChunkTemplate(make).render(text)
    want = _parse(sse_event(make(text)))
    assert _parse(got) == want and want["choices"][0]["delta"] == {"content": text}


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.tuples(st.integers(0, 3), st.text(max_size=8)), max_size=12))
def test_templates_keep_one_template_a_choice_index(chunks):
    """TextChunkTemplates makes each index's template on its first chunk; every chunk is its own index's."""
    made: list[int] = []

    def make(i, t):
        made.append(i)
        return _make(i, "m")(t)

    templates = TextChunkTemplates(make)
    for idx, text in chunks:
        assert _parse(templates.render(idx, text)) == _parse(sse_event(_make(idx, "m")(text)))
    assert sorted(made) == sorted({i for i, _ in chunks})  # one rendering an index
