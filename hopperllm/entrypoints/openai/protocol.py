"""OpenAI-compatible request and response models (pydantic v2), with vLLM's extra sampling fields.

Requests ignore fields they do not know, as OpenAI's API does. Range checks that SamplingParams already
makes (temperature >= 0, top_p in (0, 1], ...) stay there, so the server and the Python API agree; the
models here bound only what could otherwise overflow or flood the engine (seed, n, logprobs) and reject
NaN and infinity.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer

from hopperllm.sampling_params import SamplingParams, StructuredOutputsParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's limit on choices per request

# The error `type` for each status: the names of the `openai` client's exception classes.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# -- errors ---------------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIBaseModel):
    object: Literal["error"] = "error"
    error: ErrorInfo


def error_payload(status: int, message: str, param: str | None = None, code: int | str | None = None) -> dict:
    """OpenAI's error body: {"object": "error", "error": {"message", "type", "param", "code"}}."""
    info = ErrorInfo(
        message=message,
        type=ERROR_TYPES.get(status, "APIError"),
        param=param,
        code=code if code is not None else status,
    )
    return ErrorResponse(error=info).model_dump()


# -- requests -------------------------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


TokenIds = Annotated[list[StrictInt], Field(description="token ids")]


class JsonSchemaFormat(OpenAIBaseModel):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON that follows `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(OpenAIBaseModel):
    """vLLM's `structured_outputs` extra: one constraint (see StructuredOutputsParams)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class SamplingRequest(OpenAIBaseModel):
    """The fields completions and chat share: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a JSON key) -> bias in [-100, 100]
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM: per prompt token, non-streamed
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    return_tokens_as_token_ids: bool | None = None  # vLLM: logprobs name tokens "token_id:N"
    priority: StrictInt = 0  # vLLM: the order under --scheduling-policy priority (lower first)
    use_beam_search: bool = False  # vLLM: n beams, the n best returned (no streaming)
    length_penalty: float = 1.0  # beam search: scores are cum_logprob / length ** length_penalty
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint_field(self) -> str | None:
        """The field the request's structured output constraint comes from (the param of its 400s)."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        fields = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
        return next((f for f in fields if getattr(self, f) is not None), None)

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's one output constraint, or None; ValueError (HTTP 400) for two or a bad one."""
        given = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
            given.append(("response_format", StructuredOutputsParams(json=rf.json_schema.json_schema)))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given.append(
                (
                    "structured_outputs",
                    StructuredOutputsParams(
                        json=so.json_,
                        regex=so.regex,
                        choice=so.choice,
                        grammar=so.grammar,
                        json_object=so.json_object,
                        disable_any_whitespace=so.disable_any_whitespace,
                    ),
                )
            )
        for name, kind in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                given.append((name, StructuredOutputsParams(**{kind: value})))
        if len(given) > 1:
            raise ValueError(
                "give one structured output constraint, got " + ", ".join(name for name, _ in given)
            )
        if not given:
            return None
        name, params = given[0]
        try:
            params.verify()
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return params

    def to_sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: dict | None = None,
    ) -> SamplingParams:
        """Raises ValueError (HTTP 400) for values SamplingParams rejects. `defaults` (the model's generation
        config, vLLM's rule) fill the sampling fields the request leaves unset."""
        defaults = defaults or {}

        def pick(value, default, name=None):
            if value is not None:
                return value
            return defaults.get(name, default) if name else default

        logit_bias = None
        if self.logit_bias is not None:
            logit_bias = {}
            for key, bias in self.logit_bias.items():
                try:
                    logit_bias[int(key)] = bias
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None

        return SamplingParams(
            n=self.n,
            temperature=pick(self.temperature, 1.0, "temperature"),
            top_p=pick(self.top_p, 1.0, "top_p"),
            top_k=pick(self.top_k, -1, "top_k"),
            min_p=pick(self.min_p, 0.0, "min_p"),
            repetition_penalty=pick(self.repetition_penalty, 1.0, "repetition_penalty"),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            logit_bias=logit_bias,
            allowed_token_ids=self.allowed_token_ids,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=self.structured_outputs_params(),
            bad_words=self.bad_words,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default; null: the room left in max_model_len
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)  # at most the server's --max-logprobs
    add_special_tokens: bool = True  # vLLM: add BOS to text prompts
    suffix: str | None = None  # OpenAI's insertion suffix: not supported (400), as in vLLM


class ChatContentPart(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... reach the chat template
    role: str
    content: str | list[ChatContentPart] | None = None


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # at most the server's --max-logprobs
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM / HF: continue the last (assistant) message, no new turn
    tools: list[ChatCompletionTool] | None = None
    # None: "auto" when tools are given, else "none" (vLLM's rule)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; "required" and "auto" may return several calls
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra variables for the chat template

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def constraint_field(self) -> str | None:
        choice = self.effective_tool_choice
        if self.tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
            return "tool_choice"
        return super().constraint_field()

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """A named or required tool choice constrains the output to its calls' JSON (vLLM's rule)."""
        from hopperllm.entrypoints.openai.tool_calls import named_tool_schema, required_tools_schema

        params = super().structured_outputs_params()
        choice = self.effective_tool_choice
        if not self.tools or not (choice == "required" or isinstance(choice, NamedToolChoice)):
            return params
        if params is not None:
            raise ValueError(
                "tool_choice constrains the output already: drop the response_format / guided field"
            )
        if isinstance(choice, NamedToolChoice):
            return StructuredOutputsParams(json=named_tool_schema(self.tools, choice.function.name))
        return StructuredOutputsParams(json=required_tools_schema(self.tools))


class ResponsesInputItem(OpenAIBaseModel):
    """An input item of /v1/responses: a message (content as text or input_text / output_text parts), or
    (extra fields) a function_call (call_id, name, arguments) or function_call_output (call_id, output). Other
    item types (reasoning, ...) are refused with a 400 naming `input`."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: str | None = None
    content: str | list[ChatContentPart] | None = None


class ResponsesTextFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(OpenAIBaseModel):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(OpenAIBaseModel):
    """OpenAI's Responses API request (/v1/responses), as vLLM serves it: `input` as a string or items
    (messages, function calls and their outputs), `instructions` as a system message first, `text.format` for
    structured output, function `tools`. Stored only with --enable-responses-store (`store: false` opts a
    request out)."""

    model: str | None = None
    input: str | list[ResponsesInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: ResponsesText | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    priority: StrictInt = 0
    structured_outputs: StructuredOutputsRequest | None = None  # as on the chat endpoint


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: TokenIds


# -- responses ------------------------------------------------------------------------------------
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class PromptTokenUsageInfo(OpenAIBaseModel):
    cached_tokens: int | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # with --enable-prompt-tokens-details (vLLM's flag): the prompt tokens the prefix cache served
    prompt_tokens_details: PromptTokenUsageInfo | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_details(self, handler):
        out = handler(self)
        if out.get("prompt_tokens_details") is None:
            out.pop("prompt_tokens_details", None)
        return out


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(OpenAIBaseModel):
    """vLLM's Logprob: a token's logprob, its rank in the vocabulary where known, its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token (None for the first) {token id: PromptLogprob} of that token and the top k
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended the choice
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class ChatLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatChoiceLogProbs(OpenAIBaseModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # --reasoning-parser: the thinking before the answer
    tool_calls: list[ToolCall] = Field(default_factory=list)


class _SparseModel(OpenAIBaseModel):
    """Serialized with only the keys that have values (stream deltas)."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_SparseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_SparseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM


class DeltaMessage(_SparseModel):
    """A streamed message delta: only the keys it has ({"role": ...} first, then {"content": ...})."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "hopperllm"
    root: str | None = None
    max_model_len: int | None = None
    # hopperllm's additions (clients ignore unknown fields): how the engine serves the model, which
    # `hopperllm bench serve` copies into its record
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    tensor_parallel_size: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class TokenizerInfoResponse(OpenAIBaseModel):
    """vLLM's /tokenizer_info: what a client needs to tokenize like the server (lm-eval's remote tokenizer)."""

    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int


class VersionResponse(OpenAIBaseModel):
    version: str


def sse_event(payload: BaseModel | dict[str, Any] | str) -> str:
    """One Server-Sent Event line pair: `data: <json>` (or `data: [DONE]`)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


class TextChunkTemplate:
    """The SSE line of a streamed chunk in its most common form (one choice carrying only new text), made
    without building and serializing the pydantic models for every token: `make(text)` is rendered once with
    a placeholder text, and each chunk splices its own text's JSON into that rendering. The rest of the
    line is pydantic's to the byte; the text is json's (ASCII-escaped: the same string once parsed)."""

    _MARK = "@@hopperllm-chunk-text@@"

    def __init__(self, make):
        rendered = make(self._MARK).model_dump_json()
        mark = json.dumps(self._MARK)
        if rendered.count(mark) != 1:
            raise ValueError("the chunk's rendering does not hold its text exactly once")
        self._head, self._tail = rendered.split(mark)

    def render(self, text: str) -> str:
        return f"data: {self._head}{json.dumps(text)}{self._tail}\n\n"


class TextChunkTemplates:
    """A stream's TextChunkTemplate for each choice index, made from `make(index, text)` on the index's first
    chunk."""

    def __init__(self, make):
        self._make = make
        self._by_index: dict[int, TextChunkTemplate] = {}

    def render(self, index: int, text: str) -> str:
        template = self._by_index.get(index)
        if template is None:
            template = self._by_index[index] = TextChunkTemplate(lambda t: self._make(index, t))
        return template.render(text)
