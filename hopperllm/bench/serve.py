"""`hopperllm bench serve`: load an OpenAI-compatible server and measure what its clients see.

    hopperllm serve --model dummy:llama-3-8b --port 8000 &
    hopperllm bench serve --base-url http://127.0.0.1:8000 --num-prompts 500 --request-rate 8 \
        --random-input-len 1024 --random-output-len 128 --goodput ttft:500 tpot:50 \
        --output-json benchmarks/results/serve.json

An asyncio/aiohttp client, as vLLM's benchmark_serving: prompts are random token ids (or random words
with `--prompt-format text`; always text for /v1/chat/completions) of `--random-input-len` (after
`--random-prefix-len` random ones every prompt shares: a prefix-caching workload), or the rows of
a JSONL `--dataset-path` ("prompt" or "prompt_token_ids", optional "output_len"), or with
`--dataset-name sharegpt` ShareGPT's conversations as vLLM samples them (bench/datasets.py; token counts
from `--tokenizer`, else from the server's /tokenize, which vLLM's and hopperllm's servers answer; the
first turn is sent as text, the second turn's length, or `--sharegpt-output-len`, is max_tokens). Requests are sent at
`--request-rate` req/s with gamma-distributed gaps (`--burstiness` 1 = Poisson; `inf` sends all at
once), at most `--max-concurrency` in flight, streamed (`stream: true`, server-sent events) with
`ignore_eos` (unless `--no-ignore-eos`) and greedy sampling. One test request runs first: if it
fails, the benchmark stops with its error.

Per request: TTFT (send to first streamed text), ITL (gaps between streamed chunks), TPOT
((e2e - TTFT) / (output tokens - 1)), E2EL (send to last chunk). Output tokens are the server's
`usage.completion_tokens` (asked for with `stream_options.include_usage`) or else the number of chunks.
Goodput counts the requests that meet every `--goodput` SLO (milliseconds).

`results` in the JSON (vLLM's keys):
    duration, completed, failed, max_concurrency, request_rate, burstiness,
    total_input_tokens, total_output_tokens, request_throughput, request_goodput (with --goodput),
    output_throughput, total_token_throughput,
    for m in ttft, tpot, itl, e2el: mean_{m}_ms, median_{m}_ms, std_{m}_ms, p99_{m}_ms,
        and p{P}_{m}_ms for each P of --metric-percentiles when m is in --percentile-metrics
    input_lens, output_lens, ttfts, itls, e2els (seconds, per request), errors (first 20 messages)
    server_models (the server's /v1/models answer, when it has one)
The record's dtype/quantization/kv_cache_dtype/tensor_parallel_size are the server's model card's (a hopperllm
server reports them; else null), its device the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hopperllm.bench import common, datasets

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
_WORDS = (
    "the of and to in is was for on as with by he at from his an were are which this be or has had not but "
    "one all their they first its new after who two been more there can time her also other into years "
    "when would only over some these many may such most where then than them well about so city world"
).split()


@dataclass
class RequestInput:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument(
        "--dataset-name",
        choices=["random", "jsonl", "sharegpt"],
        default=None,
        help="random prompts, the JSONL of --dataset-path (the default when it is given) or ShareGPT's JSON",
    )
    p.add_argument(
        "--dataset-path",
        default=None,
        help="JSONL ('prompt' or 'prompt_token_ids', 'output_len'), or ShareGPT_V3_unfiltered_cleaned_split.json",
    )
    p.add_argument(
        "--sharegpt-output-len", type=int, default=None, help="ShareGPT: this output length for every request"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="ShareGPT: count tokens with this model's tokenizer (HF directory, .gguf, dummy:<preset>) "
        "instead of the server's /tokenize",
    )
    p.add_argument("--random-input-len", "--input-len", dest="random_input_len", type=int, default=1024)
    p.add_argument("--random-output-len", "--output-len", dest="random_output_len", type=int, default=128)
    p.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="random prompts: this many random tokens (or words) shared by every prompt before its own",
    )
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random lengths uniform in [len * (1 - r), len * (1 + r)]",
    )
    p.add_argument(
        "--prompt-format",
        choices=["token_ids", "text"],
        default="token_ids",
        help="random prompts as token ids or as words (chat endpoints always send text)",
    )
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl,e2el",
        help="metrics to report percentiles of: ttft,tpot,itl,e2el",
    )
    p.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 25,50,99")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:3000 (milliseconds)",
    )
    p.add_argument("--request-timeout", type=float, default=6 * 3600, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output-json", default=None, help="write the record (env, args, figures) here")


# -- inputs -----------------------------------------------------------------------------------
def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, val = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes KEY:MS with KEY one of ttft, tpot, e2el; got {item!r}")
        try:
            slos[key] = float(val)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {val!r} is not a number of milliseconds") from None
        if slos[key] < 0:
            raise ValueError(f"--goodput {item!r}: the SLO must not be negative")
    return slos


def dataset_name(args) -> str:
    """--dataset-name, checked against --dataset-path and the flags of the other kinds."""
    name = datasets.resolve_name(args.dataset_name, args.dataset_path)
    if name != "sharegpt" and (args.sharegpt_output_len is not None or args.tokenizer is not None):
        raise ValueError("--sharegpt-output-len and --tokenizer are for --dataset-name sharegpt")
    if name != "random" and args.random_prefix_len:
        raise ValueError("--random-prefix-len is for random prompts")
    if args.random_prefix_len < 0:
        raise ValueError("--random-prefix-len must not be negative")
    return name


def sample_requests(
    args,
    rng: np.random.Generator,
    chat: bool,
    count_tokens: Callable[[Sequence[str]], Iterable[int]] | None = None,
) -> list[RequestInput]:
    """The benchmark's requests. ShareGPT needs `count_tokens` (texts -> their token counts)."""
    name = dataset_name(args)
    if name == "sharegpt":
        pairs = datasets.load_sharegpt(args.dataset_path, args.seed)
        assert count_tokens is not None
        rows = datasets.sample_sharegpt(pairs, args.num_prompts, count_tokens, args.sharegpt_output_len)
        return [RequestInput(r.prompt, r.prompt_len, r.output_len) for r in rows]
    if name == "jsonl":
        reqs = []
        for row in common.take(common.read_dataset(args.dataset_path), args.num_prompts):
            out_len = int(row.get("output_len", args.random_output_len))
            if "prompt" in row and (chat or "prompt_token_ids" not in row):
                reqs.append(RequestInput(row["prompt"], len(row["prompt"].split()), out_len))
            elif chat:
                raise ValueError("chat endpoints need text prompts: give the dataset a 'prompt' field")
            else:
                ids = [int(t) for t in row["prompt_token_ids"]]
                reqs.append(RequestInput(ids, len(ids), out_len))
        return reqs
    r = args.random_range_ratio
    if not 0 <= r < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, int(n * (1 - r))), max(1, int(n * (1 + r)))
        return rng.integers(lo, hi + 1, size=args.num_prompts)

    text = chat or args.prompt_format == "text"

    def random_prompt(n: int) -> list:
        if text:
            return [_WORDS[j] for j in rng.integers(0, len(_WORDS), size=n)]
        return rng.integers(10, 256, size=n).tolist()  # ids every vocabulary has

    prefix = random_prompt(args.random_prefix_len) if args.random_prefix_len else []
    in_lens, out_lens = lengths(args.random_input_len), lengths(args.random_output_len)
    reqs = []
    for i in range(args.num_prompts):
        n = int(in_lens[i])
        words = prefix + random_prompt(n)
        prompt: str | list[int] = " ".join(words) if text else words
        reqs.append(RequestInput(prompt, args.random_prefix_len + n, int(out_lens[i])))
    return reqs


async def arrivals(reqs: list[RequestInput], rate: float, burstiness: float, rng: np.random.Generator):
    """Yield the requests, sleeping gamma-distributed gaps (mean 1/rate, shape burstiness) between them."""
    for i, req in enumerate(reqs):
        yield req
        if math.isinf(rate) or i == len(reqs) - 1:
            continue
        await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness))))


# -- one request --------------------------------------------------------------------------------
def build_payload(model: str, req: RequestInput, chat: bool, ignore_eos: bool) -> dict:
    payload: dict = {
        "model": model,
        "temperature": 0.0,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
    return payload


async def send_request(
    session, url: str, model: str, req: RequestInput, chat: bool, ignore_eos: bool, pbar=None
) -> RequestResult:
    """POST one streaming request; parse the server-sent events as they arrive."""
    import aiohttp

    res = RequestResult(prompt_len=req.prompt_len)
    chunks = 0
    text: list[str] = []
    st = time.perf_counter()
    last = st
    try:
        async with session.post(url, json=build_payload(model, req, chat, ignore_eos)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:300]
                    return res
                choices = msg.get("choices") or []
                if choices:
                    c = choices[0]
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if piece:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - st
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        text.append(piece)
                usage = msg.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens"):
                        res.prompt_len = int(usage["prompt_tokens"])
        res.latency = last - st
        res.generated_text = "".join(text)
        res.output_tokens = res.output_tokens or chunks
        if chunks == 0:
            res.error = "the stream held no text"
        else:
            res.success = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if pbar is not None:
            pbar.update(1)
    return res


# -- metrics ----------------------------------------------------------------------------------
def calculate_metrics(
    outputs: list[RequestResult],
    duration: float,
    percentile_metrics: list[str],
    percentiles: list[float],
    slos: dict[str, float],
) -> dict:
    ok = [o for o in outputs if o.success]
    ttfts = [o.ttft for o in ok]
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    itls = [x for o in ok for x in o.itl]
    e2els = [o.latency for o in ok]
    n_in = sum(o.prompt_len for o in ok)
    n_out = sum(o.output_tokens for o in ok)
    r: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
    }
    if slos:
        good = 0
        for o in ok:
            tpot = (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0
            vals = {"ttft": o.ttft, "tpot": tpot, "e2el": o.latency}
            good += all(vals[k] * 1e3 <= slo for k, slo in slos.items())
        r["request_goodput"] = good / duration
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ps = sorted({99.0, *percentiles}) if name in percentile_metrics else [99.0]
        s = common.summarize(vals, ps, scale=1e3)
        r[f"mean_{name}_ms"], r[f"median_{name}_ms"], r[f"std_{name}_ms"] = s["mean"], s["median"], s["std"]
        for p in ps:
            r[f"p{common.pct_name(p)}_{name}_ms"] = s[f"p{common.pct_name(p)}"]
    r["input_lens"] = [o.prompt_len for o in outputs]
    r["output_lens"] = [o.output_tokens for o in outputs]
    r["ttfts"] = [o.ttft for o in outputs]
    r["itls"] = [o.itl for o in outputs]
    r["e2els"] = [o.latency for o in outputs]
    r["errors"] = [o.error for o in outputs if o.error][:20]
    return r


# -- the run ----------------------------------------------------------------------------------
async def _server_token_counts(base_url: str, model: str | None, texts: Sequence[str]) -> list[int]:
    """Token counts of `texts` from the server's /tokenize (vLLM's: {"prompt"} -> {"count"}), all at once."""
    import aiohttp

    url = base_url + "/tokenize"

    async def one(session, text: str) -> int:
        body = {"prompt": text, **({"model": model} if model else {})}
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            return int((await resp.json(content_type=None))["count"])

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return list(await asyncio.gather(*(one(session, t) for t in texts)))
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"counting ShareGPT's tokens through {url} failed ({e or type(e).__name__}): give --tokenizer, or a "
            "server with /tokenize (vLLM's and hopperllm's have it)"
        ) from None


async def _get_json(session, url: str):
    import aiohttp

    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, ValueError):
        return None


async def run_benchmark(
    args, reqs: list[RequestInput], base_url: str, chat: bool
) -> tuple[dict, str, object]:
    import aiohttp
    from tqdm.auto import tqdm

    url = base_url + args.endpoint
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = await _get_json(session, base_url + "/v1/models")
        model = args.model
        if model is None:
            try:
                model = models["data"][0]["id"]
            except (TypeError, KeyError, IndexError):
                raise ValueError(
                    f"no --model given and {base_url}/v1/models names none: pass --model"
                ) from None
        test = await send_request(session, url, model, reqs[0], chat, args.ignore_eos)
        if not test.success:
            raise ValueError(
                f"the initial test request to {url} failed ({test.error}): check the server, "
                "--base-url, --endpoint and --model"
            )
        rng = np.random.default_rng(args.seed + 1)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        pbar = tqdm(total=len(reqs), desc="Requests", unit="req", disable=args.disable_tqdm)

        async def one(req: RequestInput) -> RequestResult:
            if sem is None:
                return await send_request(session, url, model, req, chat, args.ignore_eos, pbar)
            async with sem:
                return await send_request(session, url, model, req, chat, args.ignore_eos, pbar)

        start = time.perf_counter()
        tasks = []
        async for req in arrivals(reqs, args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        pbar.close()
    metrics = calculate_metrics(
        outputs,
        duration,
        [m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
        common.parse_float_list(args.metric_percentiles, "--metric-percentiles"),
        parse_goodput(args.goodput),
    )
    return metrics, model, models


def main(args: argparse.Namespace) -> int:
    common.check_positive("--num-prompts", args.num_prompts)
    common.check_positive("--random-input-len", args.random_input_len)
    common.check_positive("--random-output-len", args.random_output_len)
    common.check_positive("--max-concurrency", args.max_concurrency, allow_none=True)
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (inf sends all at once)")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    bad = [m for m in args.percentile_metrics.split(",") if m.strip() and m.strip() not in METRICS]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown metric {bad[0]!r}; use {','.join(METRICS)}")
    pcts = common.parse_float_list(args.metric_percentiles, "--metric-percentiles")
    if any(not 0 < p < 100 for p in pcts):
        raise ValueError("--metric-percentiles must be between 0 and 100")
    parse_goodput(args.goodput)
    if not args.endpoint.startswith("/"):
        raise ValueError(f"--endpoint must start with '/', got {args.endpoint!r}")
    chat = "chat" in args.endpoint
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")

    common.check_positive("--sharegpt-output-len", args.sharegpt_output_len, allow_none=True)
    count_tokens = None
    if dataset_name(args) == "sharegpt":
        if args.tokenizer:
            count_tokens = datasets.local_token_counter(args.tokenizer)
        else:

            def count_tokens(texts: Sequence[str]) -> list[int]:
                return asyncio.run(_server_token_counts(base_url, args.model, texts))

    reqs = sample_requests(args, np.random.default_rng(args.seed), chat, count_tokens)
    print(
        f"Traffic request rate: {args.request_rate}, burstiness {args.burstiness}, "
        f"max concurrency {args.max_concurrency}, {len(reqs)} requests to {base_url}{args.endpoint}"
    )
    metrics, model, models = asyncio.run(run_benchmark(args, reqs, base_url, chat))
    metrics = {
        "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        **metrics,
        "server_models": models,
    }
    _print_summary(args, metrics)
    rec = common.make_record("serve", args, metrics, model=model)
    rec.update(served_as(models, model), base_url=base_url)
    common.write_json(args.output_json, rec)
    return 0


SERVED_AS = ("dtype", "quantization", "kv_cache_dtype", "tensor_parallel_size")


def served_as(models: dict | None, model: str) -> dict:
    """The record's dtype / quantization / kv_cache_dtype / tensor_parallel_size: what the server's
    /v1/models card of `model` says (hopperllm's cards carry them), else null."""
    card = next((m for m in (models or {}).get("data") or [] if m.get("id") == model), {})
    return {k: card.get(k) for k in SERVED_AS}


def _print_summary(args, r: dict) -> None:
    rows: list[tuple[str, object]] = [
        ("Successful requests", r["completed"]),
        ("Failed requests", r["failed"]),
        ("Maximum request concurrency", r["max_concurrency"]),
        ("Benchmark duration (s)", r["duration"]),
        ("Total input tokens", r["total_input_tokens"]),
        ("Total generated tokens", r["total_output_tokens"]),
        ("Request throughput (req/s)", r["request_throughput"]),
    ]
    if "request_goodput" in r:
        rows.append(("Request goodput (req/s)", r["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", r["output_throughput"]),
        ("Total Token throughput (tok/s)", r["total_token_throughput"]),
    ]
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    pcts = common.parse_float_list(args.metric_percentiles, "--metric-percentiles")
    for m in selected:
        up = m.upper()
        rows.append((f"-- {METRIC_TITLES[m]} --", None))
        rows += [(f"Mean {up} (ms)", r[f"mean_{m}_ms"]), (f"Median {up} (ms)", r[f"median_{m}_ms"])]
        rows += [(f"P{common.pct_name(p)} {up} (ms)", r[f"p{common.pct_name(p)}_{m}_ms"]) for p in pcts]
    common.print_table("Serving Benchmark Result", rows)
    if r["errors"]:
        print(f"first error: {r['errors'][0]}")
