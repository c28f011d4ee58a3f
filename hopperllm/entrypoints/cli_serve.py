"""`hopperllm serve`: the OpenAI-compatible HTTP server (vLLM's `vllm serve` flags)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

API_KEY_ENV = "HOPPERLLM_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 16 << 20  # 16 MiB (kept here so `hopperllm --help` needs no fastapi/uvicorn)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def add_parser(sub) -> None:
    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.entrypoints.openai.reasoning import REASONING_PARSERS
    from hopperllm.entrypoints.openai.tool_calls import TOOL_PARSERS

    p = sub.add_parser(
        "serve",
        help="serve the OpenAI API (/v1/completions, /v1/chat/completions, ...) over HTTP",
    )
    p.add_argument("model_tag", nargs="?", default=None, help="the model, as with --model")
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0: every interface)",
    )
    g.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free port")
    g.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV})"
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) the API answers to; the first is reported (default: the --model value)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 429 with Retry-After while this many requests wait to be scheduled",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger bodies get 413 (default: 16 MiB)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish before aborting them (default: 30)",
    )
    g.add_argument("--enable-log-requests", action="store_true", help="log each request's prompt and params")
    g.add_argument(
        "--max-log-len", type=int, default=None, help="log at most this many prompt characters and token ids"
    )
    g.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no periodic engine log line (throughput, running / waiting requests, KV-cache usage)",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        help="the chat template for /v1/chat/completions: a Jinja file or the template itself (default: the "
        "tokenizer's)",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let chat requests with tools take tool_choice "auto" (the default there): the output is read for '
        "calls by --tool-call-parser",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help="how tool calls are written in the model's output: llama3_json (Llama 3.1/3.2 JSON), pythonic / "
        "llama4_pythonic (Llama 3.2 / 4: [f(a=1), ...]), hermes (<tool_call> tags)",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served",
    )
    g.add_argument(
        "--enable-responses-store",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "0") == "1",
        help="keep /v1/responses answers in memory for previous_response_id and GET / DELETE "
        "/v1/responses/{id} (default: $VLLM_ENABLE_RESPONSES_API_STORE, as vLLM; off)",
    )
    g.add_argument(
        "--max-stored-responses",
        type=int,
        default=10000,
        help="with --enable-responses-store: how many responses to keep, the least recently used dropped first",
    )
    g.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='logprobs name their tokens "token_id:N" (a request can ask with return_tokens_as_token_ids)',
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=sorted(REASONING_PARSERS),
        help="put the model's thinking in the chat message's reasoning_content: deepseek_r1 (DeepSeek-R1 and "
        "its Llama distills: everything before </think>)",
    )
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_serve)


def _served_model_names(args) -> list[str]:
    if args.served_model_name:
        return list(args.served_model_name)
    if args.model:
        return [args.model]
    from hopperllm.loader.gguf import default_gguf_path

    return [os.path.splitext(os.path.basename(default_gguf_path()))[0]]


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else $HOPPERLLM_API_KEY; empty means none."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


def _check_args(args) -> None:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be at least 1, got {args.max_waiting_requests}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be positive, got {args.max_request_bytes}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be non-negative, got {args.shutdown_timeout}")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len must be non-negative, got {args.max_log_len}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if args.max_stored_responses < 1:
        raise ValueError(f"--max-stored-responses must be at least 1, got {args.max_stored_responses}")
    if args.chat_template is not None:
        from hopperllm.tokenizer import load_chat_template

        args.chat_template = load_chat_template(args.chat_template)


def server_stack() -> tuple[str, str]:
    """The event loop and HTTP implementation uvicorn's "auto" picks: uvloop and httptools where installed (a
    dependency, as in vLLM: serving's host work ~25% less than on asyncio and h11), else the pure-Python ones."""
    import importlib.util

    have = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    return ("uvloop" if have("uvloop") else "asyncio"), ("httptools" if have("httptools") else "h11")


def engine_process() -> bool:
    """Whether the engine core runs in a process of its own (core_proc.py; the default, as vLLM's
    VLLM_ENABLE_V1_MULTIPROCESSING): HOPPERLLM_ENABLE_MULTIPROCESSING=0 keeps it in the server's process
    (AsyncLLMEngine). On one H200, Llama-3-8B FP8, 200 x 1024/128 at once: 45.5 / 45.2 req/s and TPOT 20.9 /
    21.1 ms against 37.8 / 38.9 and 26.1 / 24.9 in one process, alternating; 8 req/s alike (perf-notes v32)."""
    value = os.environ.get("HOPPERLLM_ENABLE_MULTIPROCESSING", "1")
    if value not in ("0", "1"):
        raise ValueError(f"HOPPERLLM_ENABLE_MULTIPROCESSING={value!r}: use 0 or 1")
    return value == "1"


def cmd_serve(args) -> int:
    _check_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    logger = logging.getLogger("hopperllm.serve")

    import torch

    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.engine.async_engine import AsyncLLMEngine
    from hopperllm.entrypoints.openai.api_server import ServerSettings, bind_socket, build_app, make_server

    api_key = resolve_api_key(args.api_key)
    if args.host not in LOOPBACK_HOSTS and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    sock = bind_socket(args.host, args.port)  # fail fast, before the model loads
    try:
        torch.manual_seed(args.seed)
        engine_args = EngineArgs.from_cli_args(args)
        engine_cls = AsyncLLMEngine
        if engine_process():
            from hopperllm.engine.core_client import MPAsyncLLMEngine as engine_cls
        engine = engine_cls.from_engine_args(
            engine_args,
            max_waiting_requests=args.max_waiting_requests,
            show_progress=sys.stderr.isatty(),
            log_stats=not args.disable_log_stats,
        )
        if args.chat_template is not None:
            engine.tokenizer.chat_template = args.chat_template
        settings = ServerSettings(
            served_model_names=_served_model_names(args),
            api_key=api_key,
            max_request_bytes=args.max_request_bytes,
            shutdown_timeout_s=args.shutdown_timeout,
            log_requests=args.enable_log_requests,
            max_log_len=args.max_log_len,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            tool_call_parser=args.tool_call_parser,
            enable_prompt_tokens_details=args.enable_prompt_tokens_details,
            return_tokens_as_token_ids=args.return_tokens_as_token_ids,
            reasoning_parser=args.reasoning_parser,
            max_stored_responses=args.max_stored_responses if args.enable_responses_store else 0,
        )
        app = build_app(engine, settings)
        server = make_server(
            app, log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log
        )
        host, port = sock.getsockname()[:2]
        logger.info(
            "serving %s on http://%s:%d (OpenAI API under /v1; event loop %s, HTTP %s; engine core %s)",
            settings.served_model_names[0],
            f"[{host}]" if ":" in host else host,
            port,
            *server_stack(),
            "in a process of its own" if engine_cls is not AsyncLLMEngine else "in the server's process",
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
