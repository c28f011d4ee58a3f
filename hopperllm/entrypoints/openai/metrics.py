"""Prometheus metrics for the server, with vLLM's names, on a registry of its own (one per app).

Engine-wide numbers (running/waiting requests, KV-cache use, token counters) are read from the engine
when `/metrics` is scraped; per-request latencies are observed as each request's outputs stream by.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hopperllm.engine.async_engine import AsyncLLMEngine
from hopperllm.outputs import RequestOutput

# vLLM's buckets
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0]
# the request phases' (queue, prefill, decode, inference), as vLLM V1's
PHASE_BUCKETS_S = [*E2E_BUCKETS_S, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets for token counts)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > limit:
                return out
            out.append(v)
        exp += 1


class _EngineStatsCollector(Collector):
    """Reads `LLMEngine.get_stats()` at scrape time, so gauges are never stale."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self._engine = engine
        self._labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        s = self._engine.engine.get_stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(self._labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])  # exposed as <name>_total
            c.add_metric(self._labels, value)
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            self._engine.num_pending(),
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage
        )
        yield gauge(
            "vllm:prefix_cache_hit_rate",
            "Prefix-cache hit rate over all lookups so far.",
            s.prefix_cache_hit_rate,
        )
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.num_prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", s.num_generation_tokens
        )
        yield counter(
            "vllm:spec_decode_num_draft_tokens", "Speculative draft tokens computed.", s.num_draft_tokens
        )
        yield counter(
            "vllm:spec_decode_num_accepted_tokens",
            "Speculative draft tokens accepted.",
            s.num_accepted_tokens,
        )
        yield counter("vllm:spec_decode_num_drafts", "Speculative draft runs verified.", s.num_drafts)
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Speculative draft tokens accepted, by their position in the run.",
            labels=["model_name", "position"],
        )
        for i, n in enumerate(s.num_accepted_tokens_per_pos):
            per_pos.add_metric([*self._labels, str(i)], n)
        yield per_pos
        yield gauge("hopperllm:kv_cache_free_blocks", "Free KV-cache blocks.", s.num_free_blocks)
        yield gauge("hopperllm:kv_cache_total_blocks", "KV-cache blocks in all.", s.num_total_blocks)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_model_len: int = 4096):
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(
                model_name
            )

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS_S
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token (inter-token latency) in seconds.",
            TPOT_BUCKETS_S,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            E2E_BUCKETS_S,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TPOT_BUCKETS_S
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in the waiting queue (arrival to first scheduled) in seconds.",
            PHASE_BUCKETS_S,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in prefill (first scheduled to first token) in seconds.",
            PHASE_BUCKETS_S,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in decode (first token to last token) in seconds.",
            PHASE_BUCKETS_S,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent running (first scheduled to last token) in seconds.",
            PHASE_BUCKETS_S,
        )
        tokens = buckets_1_2_5(max_model_len)
        self.prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed, a request.", tokens
        )
        self.generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed, a request.", tokens
        )
        self.max_tokens_param = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens
        )
        self.n_param = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of finished requests (one per choice), by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(engine, model_name))

    def tracker(self, prompt_len: int, max_tokens: int | None = None, n: int = 1) -> RequestTracker:
        return RequestTracker(self, prompt_len, max_tokens, n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Observes one engine request as its outputs arrive: time to first token once, the latency between
    steps that add tokens, and at the end its end-to-end latency and each choice's finish reason."""

    def __init__(self, metrics: ServerMetrics, prompt_len: int, max_tokens: int | None = None, n: int = 1):
        self._m = metrics
        self._prompt_len = prompt_len
        self._last_token_time: float | None = None
        self._done = False
        self._max_tokens, self._n = max_tokens, n
        self._generated = 0  # the request's tokens so far, all choices

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = max((len(c.delta_token_ids) for c in out.outputs), default=0)
        self._generated += sum(len(c.delta_token_ids) for c in out.outputs)
        if new_tokens:
            if self._last_token_time is None:
                ttft = out.metrics.ttft_s if out.metrics is not None else None
                if ttft is not None:
                    self._m.time_to_first_token.observe(ttft)
            else:
                per_token = (now - self._last_token_time) / new_tokens
                for _ in range(new_tokens):
                    self._m.time_per_output_token.observe(per_token)
                    self._m.inter_token_latency.observe(per_token)
            self._last_token_time = now
        if out.finished and not self._done:
            self._done = True
            if out.metrics is not None:
                e2e = out.metrics.e2e_latency_s
                self._m.e2e_request_latency.observe(
                    e2e if e2e is not None else now - out.metrics.arrival_time
                )
                self._observe_phases(out)
            self._m.prompt_tokens.observe(self._prompt_len)
            self._m.generation_tokens.observe(self._generated)
            if self._max_tokens is not None:
                self._m.max_tokens_param.observe(self._max_tokens)
            self._m.n_param.observe(self._n)
            for c in out.outputs:
                self._m.request_success.labels(self._m.model_name, c.finish_reason or "abort").inc()

    def _observe_phases(self, out: RequestOutput) -> None:
        """Queue, prefill, decode and inference time from the engine's times of the request (monotonic)."""
        t = out.metrics
        if t.first_scheduled_time is not None:
            self._m.queue_time.observe(max(t.first_scheduled_time - t.arrival_time, 0.0))
            if t.first_token_time is not None:
                self._m.prefill_time.observe(max(t.first_token_time - t.first_scheduled_time, 0.0))
            if t.last_token_time is not None:
                self._m.inference_time.observe(max(t.last_token_time - t.first_scheduled_time, 0.0))
        if t.first_token_time is not None and t.last_token_time is not None:
            self._m.decode_time.observe(max(t.last_token_time - t.first_token_time, 0.0))

    def aborted(self, num_choices: int) -> None:
        """The request ended without finishing (client gone, or aborted at shutdown)."""
        if not self._done:
            self._done = True
            self._m.request_success.labels(self._m.model_name, "abort").inc(num_choices)
