"""Server behaviour under pressure and at shutdown: a full waiting queue answers 429, clients that leave
(queued, running, streaming or not) have their requests aborted and their KV blocks freed, draining
aborts what outlives the shutdown timeout, and SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.entrypoints.openai_utils import (
    ThreadServer,
    metric,
    read_metrics,
    start_server_process,
    wait_for,
    wait_for_idle,
)

LONG = {"prompt": "abc", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


async def _first_event(lines: AsyncIterator[str]) -> dict:
    """Read the first event of a stream. Keep `lines` referenced: an abandoned httpx line iterator
    closes the connection when it is collected, and the server would abort the request."""
    async for line in lines:
        if line:
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended before its first event")


def test_queue_full_429_and_leaving_clients_are_aborted():
    with ThreadServer(engine_kwargs=dict(max_num_seqs=1), max_waiting_requests=1) as srv:
        url = f"{srv.base_url}/v1/completions"

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as c:
                # A runs (one sequence at a time), B waits: the queue is full
                async with c.stream("POST", url, json={**LONG, "stream": True}) as a:
                    assert a.status_code == 200
                    a_lines = a.aiter_lines()
                    await _first_event(a_lines)
                    b = asyncio.create_task(c.post(url, json={**LONG, "max_tokens": 4}))
                    await asyncio.to_thread(wait_for, srv.base_url, "vllm:num_requests_waiting", 1)
                    r = await c.post(url, json={**LONG, "max_tokens": 2})
                    assert r.status_code == 429, r.text
                    assert r.headers["retry-after"] == "1"
                    assert r.json()["error"]["type"] == "RateLimitError"
                    client = openai.AsyncOpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0)
                    with pytest.raises(openai.RateLimitError):
                        await client.completions.create(model="dummy:tiny", prompt="x", max_tokens=2)
                    # B's client leaves while B is queued; then A's client leaves mid-stream
                    b.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await b
                    await asyncio.to_thread(wait_for, srv.base_url, "vllm:num_requests_waiting", 0)
                # a non-streaming request whose client times out while it runs
                with pytest.raises(httpx.ReadTimeout):
                    await c.post(url, json=LONG, timeout=0.5)
                m = await asyncio.to_thread(wait_for_idle, srv.base_url)
                assert metric(m, "vllm:request_success_total", finished_reason="abort") == 3
                assert metric(m, "vllm:generation_tokens_total") < 1500, "the abandoned requests ran on"
                r = await c.post(url, json={**LONG, "max_tokens": 3})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

        asyncio.run(scenario())


def test_drain_aborts_requests_that_outlive_the_shutdown_timeout():
    srv = ThreadServer(shutdown_timeout_s=0.5)
    with srv:

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as c:
                url = f"{srv.base_url}/v1/completions"
                async with c.stream("POST", url, json={**LONG, "stream": True}) as a:
                    a_lines = a.aiter_lines()
                    await _first_event(a_lines)
                    srv.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
                    await asyncio.sleep(0.1)
                    r = await c.post(url, json={**LONG, "max_tokens": 2})
                    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                    assert r.json()["error"]["type"] == "ServiceUnavailableError"
                    assert (await c.get(f"{srv.base_url}/health")).status_code == 503
                    lines = [line async for line in a_lines if line]
                # the stream ends with an error event instead of running past the timeout
                assert "shutting down" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"]

        t0 = time.monotonic()
        asyncio.run(scenario())
        deadline = time.monotonic() + 30
        while not srv.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.finished and time.monotonic() - t0 < 20


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    # (the server also runs the priority policy: its request's priority reaches the engine core)
    args = ["--model", "dummy:tiny", "--device", "cpu", "--scheduling-policy", "priority"]
    server = start_server_process(args, str(tmp_path / "server.log"))
    try:
        url = f"{server.base_url}/v1/completions"
        body = {
            **LONG,
            "max_tokens": 800,
            "stream": True,
            "stream_options": {"include_usage": True},
            "priority": -2,
        }
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            # new work is refused while the stream in flight finishes
            with httpx.Client(timeout=10) as c2:
                refused = c2.post(url, json={**LONG, "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
                assert c2.get(f"{server.base_url}/health").status_code == 503
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 800
        assert server.proc.wait(timeout=30) == 0
        log = server.log()
        assert "Traceback" not in log, log[-4000:]
    finally:
        server.stop()


def test_a_second_sigint_aborts_the_requests_in_flight_and_exits_0(tmp_path):
    """Ctrl+C drains; Ctrl+C again aborts what is in flight (its stream ends with an error event) and the
    server still stops cleanly: exit 0, no traceback, the engine core's process gone."""
    server = start_server_process(["--model", "dummy:tiny", "--device", "cpu"], str(tmp_path / "server.log"))
    try:
        url = f"{server.base_url}/v1/completions"
        body = {**LONG, "max_tokens": 1000, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            server.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 10
            while "draining requests in flight" not in server.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert len(rest) < 900  # ended long before its 1,000 tokens
        assert (
            "shutting down"
            in json.loads(rest[-2 if rest[-1] == "data: [DONE]" else -1].removeprefix("data: "))["error"][
                "message"
            ]
        )
        assert server.proc.wait(timeout=30) == 0
        log = server.log()
        assert "aborting the requests in flight" in log and "Traceback" not in log, log[-4000:]
    finally:
        server.stop()


def test_serve_cli_errors_exit_2(capsys):
    from hopperllm.entrypoints.cli import main

    for args, needle in [
        (["--model", "dummy:nope", "--port", "0"], "unknown dummy preset"),
        (["--model", "dummy:tiny", "--port", "70000"], "--port"),
        (["--model", "dummy:tiny", "--max-waiting-requests", "0"], "--max-waiting-requests"),
        (["dummy:tiny", "--model", "dummy:llama-2-7b"], "two models"),
        (
            ["--model", "dummy:tiny", "--enable-responses-store", "--max-stored-responses", "0"],
            "--max-stored-responses",
        ),
        (["--model", "dummy:tiny", "--chat-template", "/no/such/template.jinja"], "--chat-template"),
        (["--model", "dummy:tiny", "--chat-template", "{% for m in messages %}"], "does not parse"),
    ]:
        assert main(["serve", "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and needle in err[-1], err


def test_chat_template_flag(tmp_path):
    """--chat-template (vLLM's flag): a Jinja file replaces the tokenizer's template for chat requests, and
    LLM.chat(chat_template=...) renders the same tokens."""
    from hopperllm import LLM, SamplingParams

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    messages = [{"role": "user", "content": "hi there"}]
    server = start_server_process(
        ["--model", "dummy:tiny", "--device", "cpu", "--chat-template", str(path)],
        str(tmp_path / "server.log"),
    )
    try:
        r = httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}, timeout=30).json()
        llm = LLM(model="dummy:tiny", device="cpu", show_progress=False)
        tok = llm.get_tokenizer()
        assert r["tokens"] == tok.encode("<user>hi there>", add_special_tokens=False)
        chat = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4, "temperature": 0},
            timeout=30,
        ).json()
        ref = llm.chat(
            messages, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False, chat_template=template
        )
        assert ref[0].prompt_token_ids == r["tokens"]
        assert chat["choices"][0]["message"]["content"] == ref[0].outputs[0].text
    finally:
        assert server.stop() == 0


def test_api_key_from_environment(monkeypatch):
    from hopperllm.entrypoints.cli_serve import resolve_api_key

    monkeypatch.setenv("HOPPERLLM_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("HOPPERLLM_API_KEY", "")
    assert resolve_api_key(None) is None


def test_metrics_names_and_request_log(caplog):
    caplog.set_level(logging.INFO, logger="hopperllm.entrypoints.openai.serving")
    with ThreadServer(log_requests=True, max_log_len=5) as srv:
        r = httpx.post(
            f"{srv.base_url}/v1/completions", json={"prompt": "abcdefghij", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200
        m = read_metrics(srv.base_url)
    names = {k.split("{")[0] for k in m}
    for name in [
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hit_rate",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total",
        "vllm:spec_decode_num_drafts_total",
        "vllm:request_success_total",
        "hopperllm:kv_cache_free_blocks",
        "hopperllm:kv_cache_total_blocks",
        "vllm:inter_token_latency_seconds_count",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:request_prefill_time_seconds_sum",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prompt_tokens_bucket",
        "vllm:request_generation_tokens_sum",
        "vllm:request_params_max_tokens_sum",
        "vllm:request_params_n_count",
    ]:
        assert name in names, name
    assert metric(m, "vllm:request_success_total", finished_reason="length") == 1
    assert metric(m, "vllm:generation_tokens_total") == 3
    assert metric(m, "vllm:prompt_tokens_total") == 11
    assert metric(m, "vllm:time_per_output_token_seconds_count") == 2
    assert metric(m, "vllm:inter_token_latency_seconds_count") == 2
    for phase in ("queue", "prefill", "decode", "inference"):
        assert metric(m, f"vllm:request_{phase}_time_seconds_count") == 1
        assert metric(m, f"vllm:request_{phase}_time_seconds_sum") >= 0
    assert metric(m, "vllm:request_prefill_time_seconds_sum") + metric(
        m, "vllm:request_decode_time_seconds_sum"
    ) == pytest.approx(metric(m, "vllm:request_inference_time_seconds_sum"))
    assert metric(m, "vllm:request_prompt_tokens_sum") == 11
    assert metric(m, "vllm:request_prompt_tokens_bucket", le="10.0") == 0  # 11 tokens: in the 20 bucket
    assert metric(m, "vllm:request_prompt_tokens_bucket", le="20.0") == 1
    assert metric(m, "vllm:request_generation_tokens_sum") == 3
    assert (
        metric(m, "vllm:request_params_max_tokens_sum") == 3 and metric(m, "vllm:request_params_n_sum") == 1
    )
    logged = [rec.getMessage() for rec in caplog.records if "Received request" in rec.getMessage()]
    assert len(logged) == 1 and "'abcde'" in logged[0] and "[1, 100, 101, 102, 103]" in logged[0]


def test_prompt_tokens_details_report_prefix_cache_hits():
    """--enable-prompt-tokens-details (vLLM's flag): usage.prompt_tokens_details.cached_tokens."""
    prompt = "The same long prompt, sent twice, fills three cache blocks of sixteen tokens at least."
    with ThreadServer(engine_kwargs=dict(max_model_len=256), enable_prompt_tokens_details=True) as srv:
        url = f"{srv.base_url}/v1/completions"
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        first = httpx.post(url, json=body, timeout=60).json()["usage"]
        second = httpx.post(url, json=body, timeout=60).json()["usage"]
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        n = second["prompt_tokens"]
        assert 16 <= second["prompt_tokens_details"]["cached_tokens"] < n  # whole blocks, not the last token
    with ThreadServer() as srv:  # off by default: no such key
        usage = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "abc", "max_tokens": 1}).json()[
            "usage"
        ]
        assert "prompt_tokens_details" not in usage


def test_ping_and_the_dev_mode_prefix_cache_reset(monkeypatch):
    """/ping answers as /health (GET and POST, no key needed); HOPPERLLM_SERVER_DEV_MODE=1 adds POST
    /reset_prefix_cache (vLLM's dev route): the same prompt again then hits no cached block; 409 while a
    request runs; without dev mode there is no such route."""
    prompt = "The same long prompt, sent twice, fills three cache blocks of sixteen tokens at least."
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    with ThreadServer() as srv:
        assert httpx.get(f"{srv.base_url}/ping").status_code == 200
        assert httpx.post(f"{srv.base_url}/ping").status_code == 200
        assert httpx.post(f"{srv.base_url}/reset_prefix_cache").status_code == 404
    monkeypatch.setenv("HOPPERLLM_SERVER_DEV_MODE", "1")
    kw = dict(engine_kwargs=dict(max_model_len=2048), enable_prompt_tokens_details=True)
    with ThreadServer(**kw) as srv:
        url = f"{srv.base_url}/v1/completions"
        cached = lambda: httpx.post(url, json=body, timeout=60).json()["usage"]["prompt_tokens_details"][  # noqa: E731
            "cached_tokens"
        ]
        assert cached() == 0 and cached() >= 16
        r = httpx.post(f"{srv.base_url}/reset_prefix_cache", timeout=30)
        assert r.status_code == 200 and r.json() == {"reset": True}
        assert cached() == 0

        async def while_running() -> httpx.Response:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
                    lines = stream.aiter_lines()
                    await _first_event(lines)
                    return await client.post("/reset_prefix_cache")

        r = asyncio.run(while_running())
        assert r.status_code == 409 and r.json()["error"]["type"] == "ConflictError", r.text
    monkeypatch.setenv("HOPPERLLM_SERVER_DEV_MODE", "yes")
    with pytest.raises(ValueError, match="use 0 or 1"):
        ThreadServer().__enter__()
