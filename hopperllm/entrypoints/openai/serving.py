"""Serving the OpenAI API: request models -> engine requests -> JSON bodies or Server-Sent Events.

An HTTP request becomes one engine request per prompt (each with its n choices). Every engine request
is queued and its first output awaited before any response byte is sent, so a bad prompt or a full
queue is an HTTP status, not a broken stream. A watcher task aborts the engine requests when the
client disconnects, which frees their KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hopperllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from hopperllm.engine.beam_search import BeamSearchInstance, BeamSearchParams
from hopperllm.engine.llm_engine import QueueFullError, check_priority
from hopperllm.engine.structured_output import StructuredOutputError
from hopperllm.entrypoints.openai import responses as rsp
from hopperllm.entrypoints.openai.metrics import RequestTracker, ServerMetrics
from hopperllm.entrypoints.openai.protocol import (
    ChatChoiceLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbsContent,
    ChatMessage,
    ChatResponseMessage,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    NamedToolChoice,
    PromptLogprob,
    PromptLogprobs,
    PromptTokenUsageInfo,
    ResponsesRequest,
    SamplingRequest,
    TextChunkTemplates,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    ToolCall,
    UsageInfo,
    error_payload,
    now_s,
    random_id,
    sse_event,
)
from hopperllm.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser
from hopperllm.entrypoints.openai.tool_calls import (
    TOOL_PARSERS,
    ToolParser,
    parse_required_calls,
    tool_call_id,
    tools_for_template,
)
from hopperllm.outputs import CompletionOutput, RequestOutput
from hopperllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# request fields a SamplingParams error message may name (the 400's param: the first one it names)
_PARAM_FIELDS = (
    "logit_bias",
    "allowed_token_ids",
    "response_format",
    "structured_outputs",
    "tool_choice",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "bad_words",
    "truncate_prompt_tokens",
)

RETRY_AFTER_S = 1
MIN_LOGPROB = -9999.0  # what -inf becomes in JSON (vLLM's choice)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ABORTED_AT_SHUTDOWN = "the request was aborted: the server is shutting down"


class APIError(Exception):
    """An error with an HTTP status, sent in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: int | str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_payload(self.status, self.message, self.param, self.code), self.status, headers=self.headers
        )


@dataclass
class _EngineRequest:
    """One prompt of an HTTP request in the engine: its output stream and what has come out of it."""

    request_id: str
    prompt_text: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: AsyncIterator[RequestOutput] | None  # None: already finished (beam search)
    tracker: RequestTracker | None
    constraint_field: str | None = None  # where a structured-output constraint came from (400's param)
    first: RequestOutput | None = None
    latest: RequestOutput | None = None
    final: RequestOutput | None = None


class _DisconnectWatcher:
    """Waits for the client's `http.disconnect` and then runs `on_disconnect` (which aborts the engine
    requests). Uvicorn delivers the disconnect to every pending `receive()`, so this works beside
    Starlette's own listener in StreamingResponse."""

    def __init__(self, raw: Request, on_disconnect: Callable[[], Awaitable[None]]):
        self._raw = raw
        self._on_disconnect = on_disconnect
        self._task: asyncio.Task | None = None
        self.disconnected = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._raw.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        await self._on_disconnect()

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


def _join_logprobs(a: CompletionLogProbs | None, b: CompletionLogProbs | None) -> CompletionLogProbs | None:
    if a is None or b is None:
        return a if b is None else b
    return CompletionLogProbs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )


async def _first_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    return await anext(stream, None)


def _content_only(delta: DeltaMessage | None) -> bool:
    """A chat delta that carries text content and nothing else (no role, reasoning or tool calls)."""
    return (
        delta is not None
        and delta.content is not None
        and delta.role is None
        and delta.reasoning_content is None
        and delta.tool_calls is None
    )


async def _merge(
    streams: list[tuple[int, AsyncIterator[RequestOutput]]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several streams as they arrive, tagged with their stream's index."""
    if len(streams) == 1:
        i, stream = streams[0]
        async for item in stream:
            yield i, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_names: list[str],
        metrics: ServerMetrics | None = None,
        log_requests: bool = False,
        max_log_len: int | None = None,
        is_draining: Callable[[], bool] = lambda: False,
        enable_auto_tool_choice: bool = False,
        tool_call_parser: str | None = None,
        enable_prompt_tokens_details: bool = False,
        return_tokens_as_token_ids: bool = False,
        reasoning_parser: str | None = None,
        responses_store: rsp.ResponseStore | None = None,
    ):
        if not served_model_names:
            raise ValueError("give at least one served model name")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.metrics = metrics
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.is_draining = is_draining
        self.tokenizer = engine.tokenizer
        self.default_sampling = dict(engine.default_sampling)
        self.max_model_len = engine.config.scheduler_config.max_model_len
        self.vocab_size = engine.config.model_config.vocab_size
        self.max_logprobs = engine.config.max_logprobs
        self.scheduling_policy = engine.config.scheduler_config.policy
        self._token_strs: dict[int, str] = {}
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r}: one of {sorted(TOOL_PARSERS)}")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.enable_prompt_tokens_details = enable_prompt_tokens_details
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {reasoning_parser!r}: one of {sorted(REASONING_PARSERS)}"
            )
        self.reasoning_cls = REASONING_PARSERS[reasoning_parser] if reasoning_parser is not None else None
        self.tool_parser_cls = TOOL_PARSERS[tool_call_parser] if tool_call_parser is not None else None
        self.responses_store = responses_store  # --enable-responses-store

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # -- small endpoints --------------------------------------------------------------------------
    def show_models(self) -> ModelList:
        cfg = self.engine.config
        serving = dict(
            dtype=str(cfg.dtype).removeprefix("torch."),
            quantization=cfg.quantization,
            kv_cache_dtype=cfg.cache_config.kv_cache_dtype,
            tensor_parallel_size=cfg.parallel_config.tensor_parallel_size,
        )
        return ModelList(
            data=[
                ModelCard(id=name, root=cfg.model, max_model_len=self.max_model_len, **serving)
                for name in self.served_model_names
            ]
        )

    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self._check_model(req.model)
        try:
            if isinstance(req, TokenizeChatRequest):
                ids = self._encode_chat(req.messages, req.add_generation_prompt)
            else:
                ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    def tokenizer_info(self) -> TokenizerInfoResponse:
        tok = self.tokenizer
        return TokenizerInfoResponse(
            tokenizer_class=type(tok).__name__,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            chat_template=tok.chat_template,
            model_max_length=self.max_model_len,
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    # -- completions -------------------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        self._check_stream_options(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported: put the whole text in the prompt", param="suffix")
        self._check_logprobs(req.logprobs, "logprobs")
        self._check_logprobs(req.prompt_logprobs, "prompt_logprobs")
        prompts = self._completion_prompts(req.prompt, req.add_special_tokens)
        request_id = random_id("cmpl")
        prepared = [  # every prompt checked before any runs
            (
                rid := f"{request_id}-{i}",
                self._prepare(rid, text, ids, req, req.max_tokens, req.logprobs, "prompt"),
            )
            for i, (text, ids) in enumerate(prompts)
        ]
        if req.use_beam_search:
            reqs = [await self._beam_search(rid, req, p) for rid, p in prepared]
            return self._completion_response(req, reqs, request_id, req.model or self.model_name)
        reqs = [self._engine_request(rid, req, p) for rid, p in prepared]
        watcher = await self._start(raw, reqs)
        model = req.model or self.model_name
        if req.stream:
            return _sse_response(self._completion_events(req, reqs, watcher, request_id, model))
        aborted = await self._run_to_end(reqs, watcher)
        if aborted is not None:
            return aborted
        return self._completion_response(req, reqs, request_id, model)

    def _completion_response(
        self, req: CompletionRequest, reqs: list[_EngineRequest], request_id: str, model: str
    ) -> Response:
        choices = []
        for i, r in enumerate(reqs):
            for c in r.final.outputs:
                text = (self._echo_text(r) + c.text) if req.echo else c.text
                lp = None
                if req.logprobs is not None:
                    lp, offset = self._echo_logprobs(r.final, self._as_ids(req)) if req.echo else (None, 0)
                    lp = _join_logprobs(
                        lp,
                        self._completion_logprobs(c.token_ids, c.logprobs or [], offset, self._as_ids(req))[
                            0
                        ],
                    )
                choices.append(
                    CompletionResponseChoice(
                        index=i * req.n + c.index,
                        text=text,
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                        prompt_logprobs=self._prompt_logprobs(r, req.prompt_logprobs),
                    )
                )
        usage = self._usage(reqs)
        body = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _completion_events(
        self,
        req: CompletionRequest,
        reqs: list[_EngineRequest],
        watcher: _DisconnectWatcher,
        request_id: str,
        model: str,
    ) -> AsyncIterator[str]:
        created = now_s()
        num_choices = len(reqs) * req.n
        echo_pending = [req.echo] * num_choices
        finished = [False] * num_choices
        text_offsets = [0] * num_choices
        include_usage, continuous_usage = _usage_options(req)
        templates = TextChunkTemplates(  # the common chunk's line, a choice index
            lambda i, t: CompletionResponse(
                id=request_id,
                created=created,
                model=model,
                choices=[CompletionResponseChoice(index=i, text=t)],
            )
        )
        outputs = self._outputs(reqs)
        try:
            async for i, out in outputs:
                choices = []
                for c in out.outputs:
                    idx = i * req.n + c.index
                    if finished[idx]:
                        continue
                    finished[idx] = c.finish_reason is not None
                    text = c.delta_text
                    lp = None
                    if echo_pending[idx]:
                        text = self._echo_text(reqs[i]) + text
                        echo_pending[idx] = False
                        if req.logprobs is not None:
                            lp, text_offsets[idx] = self._echo_logprobs(out, self._as_ids(req))
                    if req.logprobs is not None and c.delta_token_ids:
                        new_entries = (c.logprobs or [])[len(c.token_ids) - len(c.delta_token_ids) :]
                        new_lp, text_offsets[idx] = self._completion_logprobs(
                            c.delta_token_ids, new_entries, text_offsets[idx], self._as_ids(req)
                        )
                        lp = _join_logprobs(lp, new_lp)
                    if not text and lp is None and c.finish_reason is None:
                        continue  # the new tokens do not decode to text yet
                    if (
                        lp is None
                        and c.finish_reason is None
                        and c.stop_reason is None
                        and len(out.outputs) == 1
                        and not continuous_usage
                    ):
                        # the common chunk (one choice, only new text) from its template: no pydantic models
                        yield templates.render(idx, text)
                        continue
                    choices.append(
                        CompletionResponseChoice(
                            index=idx,
                            text=text,
                            logprobs=lp,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                if choices:
                    usage = self._usage(reqs) if continuous_usage else None
                    yield sse_event(
                        CompletionResponse(
                            id=request_id, created=created, model=model, choices=choices, usage=usage
                        )
                    )
            if self._aborted(reqs):
                if not watcher.disconnected:
                    yield sse_event(error_payload(503, ABORTED_AT_SHUTDOWN))
                return
            if include_usage:
                yield sse_event(
                    CompletionResponse(
                        id=request_id, created=created, model=model, choices=[], usage=self._usage(reqs)
                    )
                )
            yield sse_event("[DONE]")
        except EngineDeadError as e:
            yield sse_event(error_payload(500, str(e)))
            yield sse_event("[DONE]")
        finally:
            watcher.stop()
            await outputs.aclose()
            await _close(reqs)
            self._aborted(reqs)  # counts a stream cut short by the client

    def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]], add_special_tokens: bool
    ) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per prompt; text is None for prompts given as token ids."""
        items: list = (
            [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        )
        if not items:
            raise APIError(
                400, "the prompt is empty: give a string, a list of strings or token ids", "prompt"
            )
        res = []
        for item in items:
            if not item:
                raise APIError(400, "the prompt is empty: give at least one character or token", "prompt")
            if isinstance(item, str):
                res.append((item, self.tokenizer.encode(item, add_special_tokens=add_special_tokens)))
            else:
                self._check_token_ids(item, "prompt")
                res.append((None, list(item)))
        return res

    def _echo_text(self, r: _EngineRequest) -> str:
        if r.prompt_text is None:
            r.prompt_text = self.tokenizer.decode(r.prompt_token_ids)
        return r.prompt_text

    def _prompt_logprobs(self, r: _EngineRequest, k: int | None) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs answer: per prompt token the top k and that token, with their ranks in the
        vocabulary (the prompt token's is not known when it is below the top the engine kept)."""
        out = r.final
        if k is None or out is None or out.prompt_logprobs is None:
            return None
        kept = r.params.prompt_logprobs  # the engine's top (>= k: echo with logprobs may ask for more)
        res: PromptLogprobs = []
        for tid, entry in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
            if entry is None:
                res.append(None)
                continue
            # the engine's entry is its top `kept` and the prompt token, which (if not among them) is below them
            ordered = sorted(entry.items(), key=lambda kv: -kv[1])
            item = {}
            for idx, (t, v) in enumerate(ordered):
                if idx < k or t == tid:
                    rank = idx + 1 if idx < kept else None
                    item[t] = PromptLogprob(logprob=_clamp(v), rank=rank, decoded_token=self._token_str(t))
            res.append(item)
        return res

    def _echo_logprobs(self, out: RequestOutput, as_ids: bool = False) -> tuple[CompletionLogProbs, int]:
        """echo with logprobs: the prompt tokens' logprobs (the first has none, as in OpenAI's and vLLM's
        answers), from the request's prompt logprobs."""
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return self._completion_logprobs(out.prompt_token_ids, entries, 0, as_ids)

    def _completion_logprobs(
        self,
        token_ids: list[int],
        entries: list[dict[int, float] | None],
        text_offset: int,
        as_ids: bool = False,
    ) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs for these tokens (top_logprobs also holds the sampled token, as
        in vLLM) and the text offset after them. A None entry (a prompt's first token) has no logprobs."""
        lp = CompletionLogProbs()
        for tid, entry in zip(token_ids, entries, strict=False):
            s = self._token_str(tid, as_ids)
            lp.tokens.append(s)
            lp.text_offset.append(text_offset)
            text_offset += len(s)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(_clamp(entry.get(tid)))
            top: dict[str, float] = {}
            for t, v in sorted(entry.items(), key=lambda kv: -kv[1]):
                top.setdefault(self._token_str(t, as_ids), _clamp(v))
            lp.top_logprobs.append(top)
        return lp, text_offset

    # -- chat ------------------------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        self._check_stream_options(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        self._check_logprobs(req.top_logprobs, "top_logprobs")
        self._check_logprobs(req.prompt_logprobs, "prompt_logprobs")
        ids = self._chat_prompt(req, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        request_id = random_id("chatcmpl")
        model = req.model or self.model_name
        if req.use_beam_search:
            prepared = self._prepare(request_id, None, ids, req, max_tokens, logprobs, "messages")
            r = await self._beam_search(request_id, req, prepared)
            return self._chat_response(req, r, request_id, model)
        prepared = self._prepare(request_id, None, ids, req, max_tokens, logprobs, "messages")
        r = self._engine_request(request_id, req, prepared)
        reqs = [r]
        watcher = await self._start(raw, reqs)
        if req.stream:
            return _sse_response(self._chat_events(req, r, watcher, request_id, model))
        aborted = await self._run_to_end(reqs, watcher)
        if aborted is not None:
            return aborted
        return self._chat_response(req, r, request_id, model)

    def _chat_response(
        self, req: ChatCompletionRequest, r: _EngineRequest, request_id: str, model: str
    ) -> Response:
        reqs = [r]
        choices = []
        for c in r.final.outputs:
            message, finish_reason = self._chat_message(req, c)
            choices.append(
                ChatCompletionResponseChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._chat_logprobs(
                        c.token_ids, c.logprobs or [], req.top_logprobs or 0, self._as_ids(req)
                    )
                    if req.logprobs
                    else None,
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        body = ChatCompletionResponse(
            id=request_id, model=model, choices=choices, usage=self._usage(reqs),
            prompt_logprobs=self._prompt_logprobs(r, req.prompt_logprobs),
        )  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")

    async def _chat_events(
        self,
        req: ChatCompletionRequest,
        r: _EngineRequest,
        watcher: _DisconnectWatcher,
        request_id: str,
        model: str,
    ) -> AsyncIterator[str]:
        created = now_s()
        finished = [False] * req.n
        include_usage, continuous_usage = _usage_options(req)
        templates = TextChunkTemplates(  # the common chunk's line, a choice index
            lambda i, t: ChatCompletionStreamResponse(
                id=request_id,
                created=created,
                model=model,
                choices=[ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=t))],
            )
        )

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse_event(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=model, choices=choices, usage=usage
                )
            )

        outputs = self._outputs([r])
        streams = [
            _ChatChoiceStream(self._tool_mode(req), req, self.tool_parser_cls, self.reasoning_cls)
            for _ in range(req.n)
        ]
        try:
            for i in range(req.n):  # the role comes first, once per choice
                yield chunk(
                    [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
                )
            async for _, out in outputs:
                choices = []
                for c in out.outputs:
                    if finished[c.index]:
                        continue
                    finished[c.index] = c.finish_reason is not None
                    lp = None
                    if req.logprobs and c.delta_token_ids:
                        new_entries = (c.logprobs or [])[len(c.token_ids) - len(c.delta_token_ids) :]
                        lp = self._chat_logprobs(
                            c.delta_token_ids, new_entries, req.top_logprobs or 0, self._as_ids(req)
                        )
                    delta, finish_reason = streams[c.index].step(c)
                    if delta is None and lp is None and c.finish_reason is None:
                        continue
                    if (
                        _content_only(delta)
                        and lp is None
                        and finish_reason is None
                        and c.stop_reason is None
                        and len(out.outputs) == 1
                        and not continuous_usage
                    ):  # the common chunk (one choice, new content) from its template: no pydantic models
                        yield templates.render(c.index, delta.content)
                        continue
                    choices.append(
                        ChatCompletionStreamChoice(
                            index=c.index,
                            delta=delta or DeltaMessage(),
                            logprobs=lp,
                            finish_reason=finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                if choices:
                    yield chunk(choices, self._usage([r]) if continuous_usage else None)
            if self._aborted([r]):
                if not watcher.disconnected:
                    yield sse_event(error_payload(503, ABORTED_AT_SHUTDOWN))
                return
            if include_usage:
                yield chunk([], self._usage([r]))
            yield sse_event("[DONE]")
        except EngineDeadError as e:
            yield sse_event(error_payload(500, str(e)))
            yield sse_event("[DONE]")
        finally:
            watcher.stop()
            await outputs.aclose()
            await _close([r])
            self._aborted([r])  # counts a stream cut short by the client

    # -- /v1/responses ---------------------------------------------------------------------------
    async def create_response(self, req: ResponsesRequest, raw: Request) -> Response:
        """OpenAI's Responses API over the chat path (entrypoints/openai/responses.py)."""
        self._check_model(req.model)
        store = self.responses_store
        history = None
        if req.previous_response_id is not None and store is not None:
            previous = store.get(req.previous_response_id)
            if previous is None:
                raise APIError(
                    404, f"Previous response with id '{req.previous_response_id}' not found.",
                    param="previous_response_id",
                )  # fmt: skip
            history = previous[1]
        try:
            chat = rsp.to_chat_request(req, history)
        except rsp.ResponsesInputError as e:
            raise APIError(400, str(e), param=e.param) from None
        ids = self._chat_prompt(chat, "input")
        response_id = rsp.new_id("resp")
        model = req.model or self.model_name
        prepared = self._prepare(response_id, None, ids, chat, chat.max_completion_tokens, None, "input")
        r = self._engine_request(response_id, chat, prepared)
        watcher = await self._start(raw, [r])
        created = now_s()
        if req.stream:
            return _sse_response(self._response_events(req, chat, r, watcher, response_id, model, created))
        aborted = await self._run_to_end([r], watcher)
        if aborted is not None:
            return aborted
        c = r.final.outputs[0]
        message, _ = self._chat_message(chat, c)
        output = []
        if message.reasoning_content:
            output.append(rsp.reasoning_item(rsp.new_id("rs"), message.reasoning_content))
        if message.content or not message.tool_calls:
            output.append(rsp.message_item(rsp.new_id("msg"), message.content or "", "completed"))
        for call in message.tool_calls or ():
            fn = call.function
            output.append(
                rsp.function_call_item(rsp.new_id("fc"), call.id, fn.name, fn.arguments, "completed")
            )
        body = rsp.response_object(
            req, response_id, model, created, status="completed", output=output,
            temperature=r.params.temperature, top_p=r.params.top_p,
            usage_info=rsp.usage(self._usage([r])), finish_reason=c.finish_reason, store=self._stores(req),
        )  # fmt: skip
        self._store_response(req, chat, body)
        return JSONResponse(body)

    def _stores(self, req: ResponsesRequest) -> bool:
        return self.responses_store is not None and req.store is not False

    def _store_response(self, req: ResponsesRequest, chat: ChatCompletionRequest, body: dict) -> None:
        if self._stores(req):
            self.responses_store.put(body, rsp.conversation_after(req, chat, body["output"]))

    def stored_response(self, response_id: str, delete: bool = False) -> dict:
        """GET (or DELETE) /v1/responses/{id}: the stored response (or OpenAI's deletion object); 404 without."""
        store = self.responses_store
        item = store.get(response_id) if store is not None else None
        if item is None:
            why = "" if store is not None else " (this server stores no responses: --enable-responses-store)"
            raise APIError(404, f"Response with id '{response_id}' not found{why}.", param="response_id")
        if delete:
            store.delete(response_id)
            return {"id": response_id, "object": "response", "deleted": True}
        return item[0]

    async def _response_events(
        self,
        req: ResponsesRequest,
        chat: ChatCompletionRequest,
        r: _EngineRequest,
        watcher: _DisconnectWatcher,
        response_id: str,
        model: str,
        created: int,
    ) -> AsyncIterator[str]:
        """The Responses API's streamed events: a reasoning item (with --reasoning-parser) while the
        thinking streams, then the message item, then a function_call item per tool call (a named tool's
        arguments as they come; "required" and "auto" calls whole at the end, as the chat stream sends them),
        each opened, filled by deltas and closed in OpenAI's order."""
        event = rsp.EventWriter()

        def response(status: str, output: list, usage=None, finish_reason=None) -> dict:
            return rsp.response_object(
                req, response_id, model, created, status=status, output=output,
                temperature=r.params.temperature, top_p=r.params.top_p, usage_info=usage,
                finish_reason=finish_reason, store=self._stores(req),
            )  # fmt: skip

        done_items: list[dict] = []
        open_kind = None  # "reasoning", "message" or "function_call": the item receiving deltas
        item_id, text = "", ""
        call_id, call_name = "", ""

        def open_item(kind: str, call=None) -> list[str]:
            nonlocal open_kind, item_id, text, call_id, call_name
            open_kind, text = kind, ""
            item_id = rsp.new_id({"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind])
            idx = len(done_items)
            if kind == "reasoning":
                item = {"id": item_id, "type": "reasoning", "summary": [], "content": []}
                return [event("response.output_item.added", output_index=idx, item=item)]
            if kind == "function_call":
                call_id, call_name = call.id, call.function.name
                item = rsp.function_call_item(item_id, call_id, call_name, "", "in_progress")
                return [event("response.output_item.added", output_index=idx, item=item)]
            return [
                event("response.output_item.added", output_index=idx, item=rsp.message_item(item_id, "", "in_progress")),
                event("response.content_part.added", item_id=item_id, output_index=idx, content_index=0,
                      part=rsp.text_part("")),
            ]  # fmt: skip

        def close_item() -> list[str]:
            nonlocal open_kind
            idx = len(done_items)
            if open_kind == "reasoning":
                item = rsp.reasoning_item(item_id, text)
                events = [event("response.reasoning_text.done", item_id=item_id, output_index=idx, content_index=0,
                                text=text)]  # fmt: skip
            elif open_kind == "function_call":
                item = rsp.function_call_item(item_id, call_id, call_name, text, "completed")
                events = [event("response.function_call_arguments.done", item_id=item_id, output_index=idx,
                                arguments=text)]  # fmt: skip
            else:
                item = rsp.message_item(item_id, text, "completed")
                events = [
                    event("response.output_text.done", item_id=item_id, output_index=idx, content_index=0,
                          text=text, logprobs=[]),
                    event("response.content_part.done", item_id=item_id, output_index=idx, content_index=0,
                          part=rsp.text_part(text)),
                ]  # fmt: skip
            events.append(event("response.output_item.done", output_index=idx, item=item))
            done_items.append(item)
            open_kind = None
            return events

        def switch_to(kind: str, call=None) -> list[str]:
            return (close_item() if open_kind is not None else []) + open_item(kind, call)

        outputs = self._outputs([r])
        stream = _ChatChoiceStream(self._tool_mode(chat), chat, self.tool_parser_cls, self.reasoning_cls)
        finish_reason = None
        called = False  # a function_call item was sent: no empty message item after it
        try:
            yield event("response.created", response=response("in_progress", []))
            yield event("response.in_progress", response=response("in_progress", []))
            async for _, out in outputs:
                c = out.outputs[0]
                delta, finish = stream.step(c)
                finish_reason = finish or finish_reason
                for kind, piece in (
                    ("reasoning", delta.reasoning_content if delta else None),
                    ("message", delta.content if delta else None),
                ):
                    if not piece:
                        continue
                    if open_kind != kind:
                        for e in switch_to(kind):
                            yield e
                    text += piece
                    name = (
                        "response.reasoning_text.delta"
                        if kind == "reasoning"
                        else "response.output_text.delta"
                    )
                    extra = {} if kind == "reasoning" else {"logprobs": []}
                    yield event(name, item_id=item_id, output_index=len(done_items), content_index=0,
                                delta=piece, **extra)  # fmt: skip
                for call in (delta.tool_calls or ()) if delta else ():
                    if call.id is not None:  # a new call (a named tool's later deltas carry arguments only)
                        called = True
                        for e in switch_to("function_call", call):
                            yield e
                    args = call.function.arguments if call.function is not None else None
                    if args:
                        text += args
                        yield event("response.function_call_arguments.delta", item_id=item_id,
                                    output_index=len(done_items), delta=args)  # fmt: skip
            if self._aborted([r]):
                if not watcher.disconnected:
                    yield event("error", message=ABORTED_AT_SHUTDOWN, code="503", param=None)
                return
            if not called and open_kind != "message":  # the answer's item exists even when it is empty
                for e in switch_to("message"):
                    yield e
            if open_kind is not None:
                for e in close_item():
                    yield e
            final = response("completed", done_items, rsp.usage(self._usage([r])), finish_reason)
            self._store_response(req, chat, final)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            yield event(kind, response=final)
        except EngineDeadError as e:
            yield event("error", message=str(e), code="500", param=None)
        finally:
            watcher.stop()
            await outputs.aclose()
            await _close([r])
            self._aborted([r])

    def _chat_prompt(self, req: ChatCompletionRequest, param: str) -> list[int]:
        """A chat request's prompt ids through the chat template (its tools, vLLM's template kwargs), after
        the tool rules; a 400 naming `param` for what the template refuses."""
        self._check_tools(req)
        template_kwargs = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            template_kwargs["continue_final_message"] = True
        if req.tools:
            template_kwargs["tools"] = tools_for_template(req.tools)
        try:
            return self._encode_chat(req.messages, req.add_generation_prompt, **template_kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def _check_tools(self, req: ChatCompletionRequest) -> None:
        """vLLM's rules for tools and tool_choice (400s naming tool_choice)."""
        choice = req.effective_tool_choice
        if req.tool_choice not in (None, "none") and not req.tools:
            raise APIError(400, "When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in req.tools
        }:
            raise APIError(
                400, f"Tool '{choice.function.name}' has not been passed in `tools`.", param="tool_choice"
            )
        if choice == "auto" and req.tools and not self.enable_auto_tool_choice:
            raise APIError(
                400,
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                param="tool_choice",
            )

    def _tool_mode(self, req: ChatCompletionRequest) -> str | None:
        """How the output becomes tool calls: "named", "required", "auto" (the parser) or None."""
        choice = req.effective_tool_choice
        if not req.tools or choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            return "named"
        return choice  # "required" or "auto"

    def _chat_message(
        self, req: ChatCompletionRequest, c: CompletionOutput
    ) -> tuple[ChatResponseMessage, str | None]:
        """A finished choice as a message (text, or tool calls; with --reasoning-parser the thinking
        apart) and its finish reason."""
        if self.reasoning_cls is not None:
            reasoning, content = self.reasoning_cls().split(c.text)
            message, finish_reason = self._answer_message(req, dataclasses.replace(c, text=content or ""))
            message.reasoning_content = reasoning
            if not message.content:
                message.content = None
            return message, finish_reason
        return self._answer_message(req, c)

    def _answer_message(
        self, req: ChatCompletionRequest, c: CompletionOutput
    ) -> tuple[ChatResponseMessage, str | None]:
        mode = self._tool_mode(req)
        if mode == "named":
            call = ToolCall(
                id=tool_call_id(), function=FunctionCall(name=req.tool_choice.function.name, arguments=c.text)
            )
            return ChatResponseMessage(content=None, tool_calls=[call]), c.finish_reason
        calls = None
        content: str | None = c.text
        if mode == "required":
            calls = parse_required_calls(c.text)
            content = None if calls else c.text
        elif mode == "auto":
            content, calls = self.tool_parser_cls().extract(c.text)
        if not calls:
            return ChatResponseMessage(content=c.text), c.finish_reason
        tool_calls = [
            ToolCall(id=tool_call_id(), function=FunctionCall(name=k.name, arguments=k.arguments))
            for k in calls
        ]
        return ChatResponseMessage(content=content, tool_calls=tool_calls), "tool_calls"

    def _encode_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool, **template_kwargs
    ) -> list[int]:
        if not messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        dicts = []
        for m in messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise APIError(
                            400,
                            f"message content of type {part.type!r} is not supported: send text parts",
                            param="messages",
                        )
                    texts.append(part.text)
                d["content"] = "\n".join(texts)
            for call in (
                d.get("tool_calls") or ()
            ):  # templates index arguments as a mapping (as vLLM gives them)
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
            dicts.append(d)
        return self.tokenizer.encode_chat(
            dicts, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def _chat_logprobs(
        self, token_ids: list[int], entries: list[dict[int, float]], top_n: int, as_ids: bool = False
    ) -> ChatChoiceLogProbs:
        content = []
        for tid, entry in zip(token_ids, entries, strict=False):
            s = self._token_str(tid, as_ids)
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(
                ChatLogProbsContent(
                    token=s,
                    logprob=_clamp(entry.get(tid)),
                    bytes=list(s.encode("utf-8")),
                    top_logprobs=[
                        ChatLogProb(
                            token=self._token_str(t, as_ids),
                            logprob=_clamp(v),
                            bytes=list(self._token_str(t, as_ids).encode()),
                        )
                        for t, v in top
                    ],
                )
            )
        return ChatChoiceLogProbs(content=content)

    # -- shared: engine requests ------------------------------------------------------------------
    def _prepare(
        self,
        request_id: str,
        prompt_text: str | None,
        token_ids: list[int],
        req: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
    ) -> tuple[str | None, list[int], SamplingParams]:
        """Check the prompt against max_model_len and build its SamplingParams. With no max_tokens the
        request may use all the room left in max_model_len (vLLM's rule). truncate_prompt_tokens keeps the
        prompt's last k tokens first (-1: as many as leave one to generate)."""
        try:
            check_priority(req.priority, self.scheduling_policy)
        except ValueError as e:
            raise APIError(400, str(e), param="priority") from None
        kept = self.engine.engine.truncate_prompt(token_ids, req.truncate_prompt_tokens)
        if len(kept) < len(token_ids):
            token_ids, prompt_text = kept, None  # the text no longer matches the ids
        n = len(token_ids)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if n >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request "
                f"has {n} input tokens. Please reduce the length of the input.",
                param=prompt_param,
            )
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        elif n + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the input, {max_tokens} in the completion). Please reduce "
                "the length of the input or completion.",
                param="max_tokens",
            )
        try:
            # echo with logprobs (completions): the prompt tokens' logprobs too, with as many top entries
            prompt_lp = logprobs if getattr(req, "echo", False) and logprobs is not None else None
            if req.prompt_logprobs is not None:
                prompt_lp = max(prompt_lp or 0, req.prompt_logprobs)
            params = req.to_sampling_params(max_tokens, logprobs, prompt_lp, self.default_sampling)
        except ValueError as e:
            named = [(str(e).find(f), f) for f in _PARAM_FIELDS if f in str(e)]
            param = min(named)[1] if named else None  # the first field the message names
            raise APIError(400, str(e), param=param) from None
        self._check_token_ids(list(params.logit_bias or ()), "logit_bias")
        self._check_token_ids(params.allowed_token_ids or [], "allowed_token_ids")
        if self.log_requests:
            cut = self.max_log_len
            logger.info(
                "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                request_id,
                prompt_text[:cut] if prompt_text is not None and cut is not None else prompt_text,
                params,
                token_ids[:cut] if cut is not None else token_ids,
            )
        return prompt_text, token_ids, params

    def _engine_request(
        self, request_id: str, req: SamplingRequest, prepared: tuple[str | None, list[int], SamplingParams]
    ) -> _EngineRequest:
        """The engine request of one prompt `_prepare` checked."""
        prompt_text, token_ids, params = prepared
        prompt = {"prompt": prompt_text, "prompt_token_ids": token_ids}
        stream = self.engine.generate(prompt, params, request_id, priority=req.priority)
        tracker = (
            self.metrics.tracker(len(token_ids), params.max_tokens, params.n)
            if self.metrics is not None
            else None
        )
        return _EngineRequest(
            request_id, prompt_text, token_ids, params, stream, tracker, req.constraint_field()
        )

    async def _beam_search(
        self, request_id: str, req: SamplingRequest, prepared: tuple[str | None, list[int], SamplingParams]
    ) -> _EngineRequest:
        """vLLM's use_beam_search over a prompt `_prepare` checked: the n best of n beams
        (hopperllm.engine.beam_search), each step's beams run as one-token engine requests; returned
        finished, as an engine request whose outputs are the beams' generated tokens."""
        if req.stream:
            raise APIError(400, "use_beam_search does not stream: set stream to false", param="stream")
        if req.constraint_field() is not None:
            field_name = req.constraint_field()
            raise APIError(400, "use_beam_search takes no structured output constraint", param=field_name)
        prompt_text, token_ids, params = prepared
        logprobs = params.logprobs
        if self.max_logprobs >= 0 and 2 * req.n > self.max_logprobs:
            raise APIError(
                400,
                f"use_beam_search with n={req.n} asks for {2 * req.n} logprobs a step, more than the server's "
                f"--max-logprobs {self.max_logprobs}",
                param="n",
            )
        try:
            beam = BeamSearchParams(
                beam_width=req.n,
                max_tokens=params.max_tokens,
                ignore_eos=params.ignore_eos,
                temperature=params.temperature,
                length_penalty=req.length_penalty,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None
        inst = BeamSearchInstance(token_ids, beam, self.engine.engine.eos_token_ids, self.max_model_len)
        step = beam.step_params()

        async def extend(rid: str, tokens: list[int]) -> RequestOutput:
            last = None
            async for out in self.engine.generate(
                {"prompt_token_ids": tokens}, step, rid, priority=req.priority
            ):
                last = out
            return last

        for k in range(beam.max_tokens):
            if not inst.live:
                break
            steps = [extend(f"{request_id}-s{k}-b{j}", b.tokens) for j, b in enumerate(inst.live)]
            outs = await asyncio.gather(*steps, return_exceptions=True)
            error = next((o for o in outs if isinstance(o, BaseException)), None)
            if error is not None:
                raise self._engine_error(error)
            inst.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None for o in outs])
        n = len(token_ids)
        outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(b.tokens[n:]),
                token_ids=b.tokens[n:],
                cumulative_logprob=b.cum_logprob,
                logprobs=b.logprobs if logprobs is not None else None,
                finish_reason=b.finish_reason,
                stop_reason=b.stop_reason,
            )
            for i, b in enumerate(inst.best())
        ]
        final = RequestOutput(request_id, prompt_text, token_ids, outputs, finished=True)
        r = _EngineRequest(request_id, prompt_text, token_ids, params, None, None)
        r.first = r.latest = r.final = final
        return r

    async def _start(self, raw: Request, reqs: list[_EngineRequest]) -> _DisconnectWatcher:
        """Queue every engine request and wait for its first output, so that errors the engine finds
        (a token id out of range, a full queue) become an HTTP status before the response starts."""

        async def abort_all() -> None:
            for r in reqs:
                await self.engine.abort(r.request_id)

        watcher = _DisconnectWatcher(raw, abort_all)
        watcher.start()
        try:
            firsts = await asyncio.gather(*(_first_output(r.stream) for r in reqs), return_exceptions=True)
            failed = next(
                ((r, f) for r, f in zip(reqs, firsts, strict=True) if isinstance(f, BaseException)), None
            )
            if failed is not None:
                r, error = failed
                raise self._engine_error(error, r.constraint_field)
        except BaseException:
            watcher.stop()
            await _close(reqs)
            raise
        for r, first in zip(reqs, firsts, strict=True):
            r.first = first
        return watcher

    def _engine_error(self, e: BaseException, constraint_field: str | None = None) -> BaseException:
        if isinstance(e, QueueFullError):
            status = 503 if self.is_draining() else 429
            return APIError(status, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(e, EngineDeadError):
            return APIError(500, str(e))
        if isinstance(e, StructuredOutputError):
            return APIError(400, str(e), param=constraint_field)
        if isinstance(e, ValueError):
            return APIError(400, str(e))
        return e

    async def _outputs(self, reqs: list[_EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of the engine requests (the primed first ones, then the rest as they come),
        tagged with the request's index; metrics observe each one."""

        def note(r: _EngineRequest, out: RequestOutput) -> None:
            if r.tracker is not None:
                r.tracker.observe(out)
            r.latest = out
            if out.finished:
                r.final = out

        for i, r in enumerate(reqs):
            if r.first is not None:
                note(r, r.first)
                yield i, r.first
        live = [(i, r.stream) for i, r in enumerate(reqs) if r.first is not None and not r.first.finished]
        if not live:
            return
        merged = _merge(live)
        try:
            async for i, out in merged:
                note(reqs[i], out)
                yield i, out
        finally:
            await merged.aclose()

    async def _run_to_end(self, reqs: list[_EngineRequest], watcher: _DisconnectWatcher) -> Response | None:
        """Drain every output (non-streaming); returns the response to send instead if a request was
        aborted."""
        try:
            async for _ in self._outputs(reqs):
                pass
        except EngineDeadError as e:
            raise APIError(500, str(e)) from None
        finally:
            watcher.stop()
            await _close(reqs)
        if not self._aborted(reqs):
            return None
        if watcher.disconnected:
            return Response(status_code=499)  # nobody is listening
        raise APIError(503, ABORTED_AT_SHUTDOWN, headers={"Retry-After": str(RETRY_AFTER_S)})

    @staticmethod
    def _aborted(reqs: list[_EngineRequest]) -> bool:
        """Did any request end without finishing (client gone, or aborted at shutdown)? Counts them."""
        aborted = False
        for r in reqs:
            if r.final is None:
                aborted = True
                if r.tracker is not None:
                    r.tracker.aborted(r.params.n)
        return aborted

    # -- checks and helpers ----------------------------------------------------------------------
    def _check_logprobs(self, k: int | None, param: str) -> None:
        cap = self.max_logprobs
        if k is not None and cap >= 0 and k > cap:
            raise APIError(
                400, f"{param}: requested {k}, more than the server's --max-logprobs {cap}", param=param
            )

    def _as_ids(self, req: SamplingRequest) -> bool:
        return bool(req.return_tokens_as_token_ids or self.return_tokens_as_token_ids)

    def _usage(self, reqs: list[_EngineRequest]) -> UsageInfo:
        usage = _usage(reqs)
        if self.enable_prompt_tokens_details:
            cached = sum(r.latest.num_cached_tokens for r in reqs if r.latest is not None)
            usage.prompt_tokens_details = PromptTokenUsageInfo(cached_tokens=cached)
        return usage

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(
                404,
                f"The model `{model}` does not exist: this server serves {', '.join(self.served_model_names)}",
                param="model",
            )

    @staticmethod
    def _check_stream_options(req: SamplingRequest) -> None:
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options can only be given with stream=true", param="stream_options")
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(400, "prompt_logprobs are not available with stream=true", param="prompt_logprobs")

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range [0, {self.vocab_size})", param=param)

    def _token_str(self, token_id: int, as_ids: bool = False) -> str:
        """A token's text for logprobs; "token_id:N" with return_tokens_as_token_ids (vLLM's form, for
        tokens whose text is not valid UTF-8 alone)."""
        if as_ids:
            return f"token_id:{token_id}"
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s


def _clamp(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return max(logprob, MIN_LOGPROB)


def _usage(reqs: list[_EngineRequest]) -> UsageInfo:
    prompt = sum(len(r.prompt_token_ids) for r in reqs)
    completion = 0
    for r in reqs:
        if r.latest is not None:
            completion += sum(len(c.token_ids) for c in r.latest.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _usage_options(req: SamplingRequest) -> tuple[bool, bool]:
    opts = req.stream_options
    return (bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))


async def _close(reqs: list[_EngineRequest]) -> None:
    """Close the engine streams; one that had not finished aborts its request (freeing its blocks)."""
    for r in reqs:
        try:
            await r.stream.aclose()
        except RuntimeError:  # still running in a merge task that is being cancelled
            pass


class _ChatChoiceStream:
    """One streamed chat choice: content deltas, or its tool calls (see tool_calls.py). A named tool's
    arguments stream as they come; "required" calls and calls the "auto" parser finds are sent whole when
    the choice ends (text before an "auto" call streams as content first)."""

    def __init__(
        self,
        mode: str | None,
        req: ChatCompletionRequest,
        parser_cls: type[ToolParser] | None,
        reasoning_cls: type[ReasoningParser] | None = None,
    ):
        self.mode = mode
        self.req = req
        self.parser = parser_cls() if mode == "auto" and parser_cls is not None else None
        self.sent = 0  # characters of the output sent as content
        self.call_id: str | None = None
        self.reasoning = reasoning_cls() if reasoning_cls is not None else None
        self.reasoning_sent = 0  # characters of the reasoning sent
        self.answer_len = 0  # characters of the answer (after the reasoning) seen so far

    def step(self, c: CompletionOutput) -> tuple[DeltaMessage | None, str | None]:
        if self.reasoning is None:
            return self._answer_step(c)
        # the reasoning streams as reasoning_content; what follows it is the answer, streamed as without
        reasoning, answer = self.reasoning.split_stream(c.text, done=c.finish_reason is not None)
        delta_reasoning = reasoning[self.reasoning_sent :]
        self.reasoning_sent = len(reasoning)
        inner = dataclasses.replace(c, text=answer, delta_text=answer[self.answer_len :])
        self.answer_len = len(answer)
        msg, finish_reason = self._answer_step(inner)
        if delta_reasoning:
            msg = msg or DeltaMessage()
            msg.reasoning_content = delta_reasoning
        return msg, finish_reason

    def _answer_step(self, c: CompletionOutput) -> tuple[DeltaMessage | None, str | None]:
        done = c.finish_reason is not None
        if self.mode is None:
            return (DeltaMessage(content=c.delta_text) if c.delta_text else None), c.finish_reason
        if self.mode == "named":
            if not c.delta_text and self.call_id is not None:
                return None, c.finish_reason
            fn = DeltaFunctionCall(arguments=c.delta_text)
            call = DeltaToolCall(index=0, function=fn)
            if self.call_id is None:
                self.call_id = tool_call_id()
                call.id, call.type, fn.name = self.call_id, "function", self.req.tool_choice.function.name
            return DeltaMessage(tool_calls=[call]), c.finish_reason
        text = c.text
        if self.mode == "auto" and not done:
            safe, _ = self.parser.split_stream(text, done=False)
            if safe > self.sent:
                delta, self.sent = text[self.sent : safe], safe
                return DeltaMessage(content=delta), None
            return None, None
        if not done:
            return None, None  # "required": the whole array is parsed at the end
        if self.mode == "required":
            content, calls = (None, parse_required_calls(text))
        else:
            content, calls = self.parser.extract(text)
        if not calls:
            rest = text[self.sent :]
            return (DeltaMessage(content=rest) if rest else None), c.finish_reason
        msg = DeltaMessage(
            tool_calls=[
                DeltaToolCall(
                    index=i,
                    id=tool_call_id(),
                    type="function",
                    function=DeltaFunctionCall(name=k.name, arguments=k.arguments),
                )
                for i, k in enumerate(calls)
            ]
        )
        if content and len(content) > self.sent:
            msg.content = content[self.sent :]
        return msg, "tool_calls"
