"""`hopperllm bench ...` on the CPU with dummy:tiny: every subcommand runs in seconds and writes its JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import threading

import pytest

from hopperllm.bench import budget, common, roofline, serve
from hopperllm.config import ModelConfig
from hopperllm.entrypoints.cli import main
from hopperllm.loader.dummy import preset_config

RECORD_KEYS = {
    "benchmark",
    "timestamp",
    "device",
    "gpu_count",
    "tensor_parallel_size",
    "versions",
    "git_commit",
    "env",
    "model",
    "dtype",
    "quantization",
    "kv_cache_dtype",
    "args",
    "results",
}
TINY = ["--model", "dummy:tiny"]


def run_cli(argv: list[str]) -> int:
    return main(["bench", *argv])


def load(path) -> dict:
    with open(path) as f:
        rec = json.load(f)
    assert RECORD_KEYS <= rec.keys()
    assert {"hopperllm", "torch", "triton", "transformers", "cuda"} <= rec["versions"].keys()
    assert rec["device"] and isinstance(rec["gpu_count"], int)
    return rec


# -- latency / throughput / budget -------------------------------------------------------------
def test_record_names_the_switches_it_ran_under(tmp_path, monkeypatch):
    monkeypatch.setenv("HOPPERLLM_FUSED_MLP", "0")
    monkeypatch.setenv("HOPPERLLM_API_KEY", "secret")
    from hopperllm.bench.common import make_record

    rec = make_record("latency", argparse.Namespace(model="dummy:tiny"), {})
    assert rec["env"]["HOPPERLLM_FUSED_MLP"] == "0" and "HOPPERLLM_API_KEY" not in rec["env"]


def test_latency_json_and_hf_baseline(tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = run_cli(
        [
            "latency",
            *TINY,
            "--input-len",
            "24",
            "--output-len",
            "6",
            "--batch-size",
            "2",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "3",
            "--baseline",
            "hf",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    assert "Latency Benchmark Result" in capsys.readouterr().out
    rec = load(out)
    assert rec["benchmark"] == "latency" and rec["model"] == "dummy:tiny" and rec["dtype"] == "float32"
    assert rec["args"]["enable_prefix_caching"] is False  # latency runs never hit the prefix cache
    # the limits the engine ran with, defaults included
    assert rec["scheduler"] == {"max_num_seqs": 512, "max_num_batched_tokens": 8192}
    # what start-up made: on the CPU a KV cache and no CUDA graphs
    assert rec["startup"]["num_kv_blocks"] > 0 and "decode_graphs" not in rec["startup"]
    r = rec["results"]
    assert len(r["latencies"]) == 3 and len(r["iterations"]) == 3
    for key in ("e2e_ms", "ttft_ms", "tpot_ms"):
        assert {"mean", "median", "p50", "p90", "p99"} <= r[key].keys()
    for it in r["iterations"]:
        assert 0 < it["ttft_s"] <= it["e2e_s"]
        assert it["tpot_s"] == pytest.approx((it["e2e_s"] - it["ttft_s"]) / 5)
    assert set(r["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert r["baseline"]["name"] == "hf" and r["baseline"]["avg_latency"] > 0
    assert r["speedup_vs_hf"] == pytest.approx(r["baseline"]["avg_latency"] / r["avg_latency"])


def test_throughput_random_and_dataset(tmp_path):
    out = tmp_path / "tp.json"
    assert (
        run_cli(
            [
                "throughput",
                *TINY,
                "--input-len",
                "16",
                "--output-len",
                "4",
                "--num-prompts",
                "6",
                "--baseline",
                "hf",
                "--hf-max-batch-size",
                "4",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    r = load(out)["results"]
    assert r["num_requests"] == 6 and r["total_input_tokens"] == 96 and r["total_output_tokens"] == 24
    assert r["total_num_tokens"] == 120
    assert r["tokens_per_second"] == pytest.approx(120 / r["elapsed_time"])
    assert r["baseline"]["tokens_per_second"] > 0 and r["speedup_vs_hf"] > 0
    # the CPU path compiles no Triton kernel
    assert r["jit_compiles_during_run"] == {"count": 0, "kernels": []}

    ds = tmp_path / "ds.jsonl"
    ds.write_text('{"prompt": "hello world", "output_len": 3}\n{"prompt_token_ids": [20, 21, 22]}\n')
    out2 = tmp_path / "tp2.json"
    assert (
        run_cli(
            [
                "throughput",
                *TINY,
                "--dataset",
                str(ds),
                "--num-prompts",
                "3",
                "--output-len",
                "5",
                "--output-json",
                str(out2),
            ]
        )
        == 0
    )
    r = load(out2)["results"]
    assert r["num_requests"] == 3 and r["total_output_tokens"] == 3 + 5 + 3  # rows cycle; default 5


def test_budget_writes_json_csv_png(tmp_path):
    out = tmp_path / "res" / "budget.json"
    assert (
        run_cli(
            [
                "budget",
                *TINY,
                "--input-len",
                "16",
                "--output-len",
                "4",
                "--batch-sizes",
                "1,2",
                "--num-iters",
                "2",
                "--num-iters-warmup",
                "0",
                "--request-rates",
                "50,1000",
                "--num-prompts",
                "4",
                "--budget",
                "10",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    rec = load(out)
    r = rec["results"]
    assert [p["mode"] for p in r["points"]] == ["batch", "batch", "poisson", "poisson"] and r["complete"]
    assert r["batch1"]["batch_size"] == 1 and r["batch1"]["num_requests"] == 2
    assert r["best_p99"] is not None and r["max_qps_within_budget"] == r["best_p99"]["queries_per_s"]
    assert all(p["within_budget_p99"] for p in r["points"])  # 10 s is plenty for the tiny model
    png, csv_path = tmp_path / "res" / "budget.png", tmp_path / "res" / "budget.csv"
    assert r["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["mode", "batch_size", "request_rate"] and len(lines) == 5


def test_budget_keeps_the_points_of_a_run_cut_short(tmp_path, monkeypatch):
    """A time limit that stops the Poisson sweep leaves the batch sweep's points in the JSON."""

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(budget, "run_poisson", stopped)
    out = tmp_path / "budget.json"
    args = [*TINY, "--input-len", "16", "--output-len", "4", "--batch-sizes", "1,2", "--num-iters", "1"]
    rc = run_cli(
        ["budget", *args, "--num-iters-warmup", "0", "--request-rates", "50", "--output-json", str(out)]
    )
    assert rc == 130  # the CLI reports the interrupt
    r = load(out)["results"]
    assert r["complete"] is False and [p["batch_size"] for p in r["points"]] == [1, 2]
    assert r["batch1"]["batch_size"] == 1 and not (tmp_path / "budget.json.tmp").exists()


def test_budget_helpers():
    import numpy as np

    t = budget.arrival_times(np.random.default_rng(0), 2000, rate=4.0)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.1)
    assert np.all(budget.arrival_times(np.random.default_rng(0), 5, rate=math.inf) == 0)
    pts = [
        budget.make_point("batch", [1.0, 1.2], [0.1, 0.1], 1.0, 2.5, batch_size=2),
        budget.make_point("batch", [2.0, 3.0], [0.1, 0.1], 0.5, 2.5, batch_size=4),
    ]
    assert budget.best_point(pts, "within_budget_p99")["batch_size"] == 2
    assert budget.best_point(pts, "within_budget_mean")["batch_size"] == 4  # mean 2.5 <= 2.5
    assert budget.resolve_rates("auto", pts) == [1.0, 1.5, 2.0, 2.5, 3.0]  # around the best p99 point
    assert budget.resolve_rates("none", pts) == []


# -- roofline ---------------------------------------------------------------------------------
def _mc(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(preset_config(name))


def test_roofline_arithmetic():
    mc = _mc("llama-2-7b")
    assert roofline.kv_bytes_per_token(mc, 1) == 2 * 32 * 32 * 128
    assert roofline.kv_bytes_per_token(_mc("llama-2-70b"), 2) == 2 * 80 * 8 * 128 * 2
    counts = roofline.param_counts(mc)
    assert counts["num_params"] == mc.num_params
    assert counts["num_params"] == pytest.approx(6.74e9, rel=0.01)
    assert roofline.param_counts(_mc("llama-2-70b"))["num_params"] == pytest.approx(68.98e9, rel=0.01)
    gpu = roofline.GPUSpec(
        "test", bandwidth_tbps=1.0, fp8_tflops=1.0, bf16_tflops=1.0, nvlink_gbps=1.0, memory_gib=80
    )
    r = roofline.roofline_floor(
        mc, gpu, input_len=10, output_len=3, weight_bytes_per_param=1, kv_bytes_per_elem=1
    )
    weights = counts["linear_params"] + 2 * counts["lm_head_params"]  # lm_head stays at 2 bytes
    assert r["weight_bytes_per_gpu"] == weights
    assert r["decode_steps"] == 2
    kv = roofline.kv_bytes_per_token(mc, 1)
    assert r["decode_step_first"]["bytes"] == weights + 11 * kv  # context: 10 prompt + 1 fed back
    assert r["decode_step_last"]["bytes"] == weights + 12 * kv
    assert r["total_s"] == pytest.approx(r["prefill"]["floor_s"] + r["decode_s"])


@pytest.mark.parametrize(
    "preset, gpu, tp, expect_s, expect_step_ms",
    [
        ("llama-2-7b", "h100", 1, 0.33, 2.4),  # FP8 weights + FP8 KV, 2048/128 batch 1
        ("llama-2-70b", "h100", 1, 3.25, None),
        ("llama-2-70b", "h200", 2, 1.0, None),
    ],
)
def test_roofline_reference_points(preset, gpu, tp, expect_s, expect_step_ms):
    r = roofline.roofline_floor(
        _mc(preset),
        roofline.GPUS[gpu],
        input_len=2048,
        output_len=128,
        weight_bytes_per_param=1,
        kv_bytes_per_elem=1,
        tensor_parallel_size=tp,
    )
    assert r["total_s"] == pytest.approx(expect_s, rel=0.15)
    if expect_step_ms:
        assert r["tpot_floor_s"] * 1e3 == pytest.approx(expect_step_ms, rel=0.05)
    assert r["decode_step_mean"]["bound"] == "memory" and r["fits_in_memory"]


def test_roofline_tp8_allreduce_latency():
    """TP=8 on H200: 0.3 s of bandwidth and FLOPs; with 8 us per all-reduce (160 a step) about 0.5 s."""
    mc, h200 = _mc("llama-2-70b"), roofline.GPUS["h200"]
    kw = dict(
        input_len=2048, output_len=128, weight_bytes_per_param=1, kv_bytes_per_elem=1, tensor_parallel_size=8
    )
    pure = roofline.roofline_floor(mc, h200, **kw)
    assert pure["total_s"] == pytest.approx(0.30, rel=0.1)
    assert roofline.roofline_floor(mc, h200, allreduce_latency_us=8, **kw)["total_s"] == pytest.approx(
        0.5, rel=0.1
    )


def test_roofline_cli_with_measured(tmp_path, capsys):
    lat = tmp_path / "lat.json"
    assert (
        run_cli(
            [
                "latency",
                *TINY,
                "--input-len",
                "16",
                "--output-len",
                "4",
                "--batch-size",
                "1",
                "--num-iters-warmup",
                "0",
                "--num-iters",
                "2",
                "--output-json",
                str(lat),
            ]
        )
        == 0
    )
    out = tmp_path / "roof.json"
    assert run_cli(["roofline", "--measured-json", str(lat), "--output-json", str(out)]) == 0
    rec = load(out)
    r = rec["results"]
    assert rec["model"] == "dummy:tiny" and r["input_len"] == 16 and r["output_len"] == 4
    assert r["measured"]["e2e_s"] > 0 and 0 < r["pct_of_floor"]["e2e"] < 100
    out2 = tmp_path / "roof2.json"
    assert (
        run_cli(
            [
                "roofline",
                "--model",
                "llama-2-7b",
                "-q",
                "fp8",
                "--kv-cache-dtype",
                "fp8",
                "--output-json",
                str(out2),
            ]
        )
        == 0
    )
    r2 = load(out2)["results"]
    assert r2["total_s"] == pytest.approx(0.33, rel=0.05)
    assert "End-to-end floor" in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path, capsys):
    assert run_cli(["latency", *TINY, "--batch-size", "0"]) == 2
    assert run_cli(["budget", *TINY, "--batch-sizes", "1,x"]) == 2
    assert run_cli(["throughput", *TINY, "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert run_cli(["roofline", "--model", "dummy:nope"]) == 2
    assert run_cli(["serve", "--goodput", "ttft"]) == 2
    assert run_cli(["latency", *TINY, "--input-len", "2000", "--output-len", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 6 and "exceeds max_model_len 2048" in err


# -- serve: a loopback OpenAI-compatible server --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAIServer:
    """An aiohttp app in a thread: /v1/models and streaming /v1/completions + /v1/chat/completions that
    emit max_tokens fake tokens. Prompts containing 'fail' get HTTP 400."""

    def __init__(self, token_delay_s: float = 0.001, tokenize: bool = True):
        self.port = _free_port()
        self.delay = token_delay_s
        self.tokenize = tokenize  # serve /tokenize: a BOS and one token a word
        self.requests: list[dict] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self):
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self):
        from aiohttp import web

        async def models(request):
            return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.requests.append(body)
            chat = "messages" in body
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            if isinstance(prompt, str) and "fail" in prompt:
                return web.json_response({"error": {"message": "bad prompt"}}, status=400)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(self.delay)
                choice = (
                    {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                )
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            plen = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            usage = {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def tokenize(request):
            body = await request.json()
            ids = [1] + [7] * len(body["prompt"].split())
            return web.json_response({"count": len(ids), "max_model_len": 4096, "tokens": ids})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        if self.tokenize:
            app.router.add_post("/tokenize", tokenize)
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


def test_serve_against_loopback_server(tmp_path, capsys):
    out = tmp_path / "serve.json"
    with FakeOpenAIServer() as srv:
        rc = run_cli(
            [
                "serve",
                "--base-url",
                f"http://127.0.0.1:{srv.port}",
                "--num-prompts",
                "12",
                "--random-input-len",
                "8",
                "--random-output-len",
                "5",
                "--request-rate",
                "200",
                "--burstiness",
                "0.5",
                "--max-concurrency",
                "4",
                "--metric-percentiles",
                "50,90,99",
                "--goodput",
                "ttft:10000",
                "tpot:10000",
                "e2el:10000",
                "--disable-tqdm",
                "--output-json",
                str(out),
            ]
        )
        assert rc == 0
        sent = srv.requests
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert len(sent) == 13  # the test request, then 12
    assert sent[1]["model"] == "fake-model" and sent[1]["stream"] and isinstance(sent[1]["prompt"], list)
    rec = load(out)
    assert rec["benchmark"] == "serve" and rec["model"] == "fake-model"
    assert rec["dtype"] is None and rec["tensor_parallel_size"] is None  # the card says nothing of them
    r = rec["results"]
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_input_tokens"] == 96 and r["total_output_tokens"] == 60
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert r[f"{stat}_{m}_ms"] is not None and r[f"{stat}_{m}_ms"] >= 0
    assert all(len(itl) == 4 for itl in r["itls"])
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]


def test_serve_chat_dataset_and_failures(tmp_path):
    ds = tmp_path / "ds.jsonl"
    ds.write_text('{"prompt": "hello there", "output_len": 3}\n{"prompt": "please fail"}\n')
    out = tmp_path / "serve.json"
    with FakeOpenAIServer() as srv:
        assert (
            run_cli(
                [
                    "serve",
                    "--port",
                    str(srv.port),
                    "--endpoint",
                    "/v1/chat/completions",
                    "--model",
                    "fake-model",
                    "--dataset-path",
                    str(ds),
                    "--num-prompts",
                    "4",
                    "--random-output-len",
                    "2",
                    "--goodput",
                    "e2el:0",
                    "--disable-tqdm",
                    "--output-json",
                    str(out),
                ]
            )
            == 0
        )
        assert "messages" in srv.requests[-1]
    r = load(out)["results"]
    assert r["completed"] == 2 and r["failed"] == 2 and "HTTP 400" in r["errors"][0]
    assert r["total_output_tokens"] == 6 and r["request_goodput"] == 0


def _sharegpt_file(tmp_path):
    """Five usable conversations (word counts: prompt, answer) and three that vLLM's pruning drops."""
    convs = [
        ("one two three four five", "a b c d e f"),  # 6 / 7 tokens with the fake server's BOS
        ("tiny", "an answer that is long enough"),  # prompt 2 tokens: dropped
        ("a prompt of six words here", "ok"),  # answer 2 tokens: dropped unless --sharegpt-output-len
        ("w " * 1100, "fine answer here now"),  # prompt over 1024: dropped
        ("seven words make up this prompt", "x y z w"),
        ("one more prompt that fits", "and its answer"),
    ]
    data = [{"id": str(i), "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
            for i, (p, a) in enumerate(convs)]  # fmt: skip
    data.append({"id": "single", "conversations": [{"from": "human", "value": "no answer"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_serve_sharegpt_counts_tokens_on_the_server(tmp_path):
    from hopperllm.bench import datasets

    path = _sharegpt_file(tmp_path)
    out = tmp_path / "serve.json"
    args = ["serve", "--model", "fake-model", "--dataset-name", "sharegpt", "--dataset-path", str(path),
            "--num-prompts", "5", "--disable-tqdm", "--output-json", str(out)]  # fmt: skip
    with FakeOpenAIServer() as srv:
        assert run_cli([args[0], "--port", str(srv.port), *args[1:]]) == 0
        sent = srv.requests[1:]  # after the test request
    # the same order and lengths as the sampler with the server's counting rule (a BOS, a token a word)
    words = datasets.sample_sharegpt(
        datasets.load_sharegpt(str(path), 0), 5, lambda ts: [1 + len(t.split()) for t in ts]
    )
    assert [b["prompt"] for b in sent] == [w.prompt for w in words]
    assert [b["max_tokens"] for b in sent] == [w.output_len for w in words]
    assert all(isinstance(b["prompt"], str) for b in sent)
    r = load(out)["results"]
    assert r["completed"] == 5 and r["total_input_tokens"] == sum(
        len(w.prompt.split()) for w in words
    )  # usage's

    # a fixed output length keeps the short answer's conversation; a local tokenizer needs no /tokenize
    with FakeOpenAIServer(tokenize=False) as srv:
        assert run_cli([args[0], "--port", str(srv.port), *args[1:], "--sharegpt-output-len", "3",
                        "--tokenizer", "dummy:tiny"]) == 0  # fmt: skip
        sent = srv.requests[1:]
    assert {b["max_tokens"] for b in sent} == {3}
    assert "a prompt of six words here" in {b["prompt"] for b in sent}


def test_serve_random_prefix_is_shared(tmp_path):
    import numpy as np

    ns = argparse.Namespace(
        dataset_name=None, dataset_path=None, sharegpt_output_len=None, tokenizer=None, random_prefix_len=6,
        random_range_ratio=0.5, random_input_len=10, random_output_len=4, num_prompts=8, prompt_format="token_ids",
    )  # fmt: skip
    for chat in (False, True):
        reqs = serve.sample_requests(ns, np.random.default_rng(0), chat)
        toks = [r.prompt.split() if chat else r.prompt for r in reqs]
        assert len({tuple(t[:6]) for t in toks}) == 1 and len({tuple(t[6:]) for t in toks}) == 8
        assert all(
            r.prompt_len == len(t) and 11 <= r.prompt_len <= 21 for r, t in zip(reqs, toks, strict=True)
        )
    ns.random_prefix_len = 0  # none: the same prompts a seed drew before the flag (lengths, then each prompt)
    rng = np.random.default_rng(3)
    ins = rng.integers(5, 16, size=8)
    rng.integers(2, 7, size=8)
    before = [rng.integers(10, 256, size=int(n)).tolist() for n in ins]
    assert [r.prompt for r in serve.sample_requests(ns, np.random.default_rng(3), False)] == before


def test_serve_sharegpt_user_errors(tmp_path, capsys):
    path = _sharegpt_file(tmp_path)
    with FakeOpenAIServer(tokenize=False) as srv:
        base = [
            "serve",
            "--port",
            str(srv.port),
            "--model",
            "fake-model",
            "--num-prompts",
            "2",
            "--disable-tqdm",
        ]
        assert run_cli([*base, "--dataset-name", "sharegpt", "--dataset-path", str(path)]) == 2
        assert "/tokenize" in capsys.readouterr().err and srv.requests == []
        assert run_cli([*base, "--dataset-name", "sharegpt"]) == 2
        assert "needs --dataset-path" in capsys.readouterr().err
        assert run_cli([*base, "--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "none.json"),
                        "--tokenizer", "dummy:tiny"]) == 2  # fmt: skip
        assert "no such file" in capsys.readouterr().err
        assert run_cli([*base, "--sharegpt-output-len", "4"]) == 2
        assert "for --dataset-name sharegpt" in capsys.readouterr().err


def test_serve_unreachable_is_a_user_error(capsys):
    assert (
        run_cli(
            ["serve", "--port", str(_free_port()), "--model", "m", "--num-prompts", "1", "--disable-tqdm"]
        )
        == 2
    )
    assert "initial test request" in capsys.readouterr().err


def test_serve_metrics_math():
    outs = [
        serve.RequestResult(
            success=True, prompt_len=4, output_tokens=3, ttft=0.1, itl=[0.05, 0.05], latency=0.2
        ),
        serve.RequestResult(success=True, prompt_len=4, output_tokens=1, ttft=0.3, latency=0.3),
        serve.RequestResult(error="boom"),
    ]
    r = serve.calculate_metrics(outs, 2.0, ["ttft"], [50.0], {"ttft": 200})
    assert r["completed"] == 2 and r["failed"] == 1
    assert r["mean_ttft_ms"] == pytest.approx(200) and r["p50_ttft_ms"] == pytest.approx(200)
    assert r["mean_tpot_ms"] == pytest.approx(50)  # only requests with more than one token
    assert r["request_goodput"] == pytest.approx(0.5)
    assert r["output_throughput"] == pytest.approx(2.0)


def test_common_helpers():
    assert common.percentile([], 99) is None
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    s = common.summarize([1.0, 2.0], scale=1e3)
    assert s["mean"] == 1500 and s["p99"] == pytest.approx(1990)
    assert common.pct_name(99.9) == "99.9" and common.pct_name(99.0) == "99"
    assert common._finite({"a": [math.inf, math.nan, 1.0]}) == {"a": ["inf", None, 1.0]}
    assert common.git_commit() is None or len(common.git_commit()) == 40


def test_make_docs(tmp_path):
    import importlib.util

    res = tmp_path / "results"
    assert (
        run_cli(
            [
                "budget",
                *TINY,
                "--input-len",
                "8",
                "--output-len",
                "2",
                "--batch-sizes",
                "1",
                "--num-iters",
                "1",
                "--num-iters-warmup",
                "0",
                "--request-rates",
                "none",
                "--output-json",
                str(res / "budget.json"),
            ]
        )
        == 0
    )
    assert run_cli(["roofline", "--model", "llama-2-7b", "--output-json", str(res / "roofline.json")]) == 0
    (res / "other.json").write_text('{"rows": []}')
    spec = importlib.util.spec_from_file_location(
        "make_docs", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "make_docs.py")
    )
    make_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_docs)
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Title\n\nhand-written\n\n<!-- results:begin -->\nold\n<!-- results:end -->\ntail\n")
    make_docs.main(["--results-dir", str(res), "--output", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written") and text.rstrip().endswith("tail") and "old" not in text
    assert "### Response-time budget" in text and "### Roofline" in text
    assert "../results/budget.png" in text  # the plot embedded, relative to the doc
    assert "cpu" in text and "other.json" in text


@pytest.mark.slow
def test_serve_against_hopperllm_server(tmp_path):
    """`hopperllm bench serve` against our own server (`hopperllm serve --model dummy:tiny`) in a subprocess."""
    pytest.importorskip("hopperllm.entrypoints.cli_serve")
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hopperllm.entrypoints.cli",
            "serve",
            "--model",
            "dummy:tiny",
            "--port",
            str(port),
            "--uvicorn-log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 120 s"
                time.sleep(0.3)
        for endpoint in ("/v1/completions", "/v1/chat/completions"):
            out = tmp_path / f"serve{endpoint.replace('/', '_')}.json"
            assert (
                run_cli(
                    [
                        "serve",
                        "--port",
                        str(port),
                        "--endpoint",
                        endpoint,
                        "--num-prompts",
                        "6",
                        "--random-input-len",
                        "16",
                        "--random-output-len",
                        "4",
                        "--request-rate",
                        "100",
                        "--disable-tqdm",
                        "--output-json",
                        str(out),
                    ]
                )
                == 0
            )
            rec = load(out)
            assert rec["model"] == "dummy:tiny" and rec["tensor_parallel_size"] == 1  # from the model card
            assert rec["dtype"] == "float32" and rec["quantization"] is None
            r = rec["results"]
            assert r["completed"] == 6 and r["failed"] == 0
            assert r["total_output_tokens"] == 24  # usage.completion_tokens, ignore_eos honoured
            assert r["mean_ttft_ms"] > 0 and r["p99_e2el_ms"] >= r["mean_ttft_ms"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_latency_with_a_draft_model_reports_its_drafts(tmp_path, capsys):
    """bench latency with --speculative-config: the record names the draft and counts its drafts; the target
    drafting for itself (dummy:tiny, the same weights) has every draft accepted, K + 1 tokens a step."""
    out = tmp_path / "spec.json"
    spec = '{"model": "dummy:tiny", "num_speculative_tokens": 3}'
    argv = ["latency", *TINY, "--input-len", "16", "--output-len", "13", "--num-iters", "1"]
    assert run_cli([*argv, "--speculative-config", spec, "--output-json", str(out)]) == 0
    assert "Mean acceptance length" in capsys.readouterr().out
    s = load(out)["speculative"]
    assert (s["method"], s["model"], s["num_speculative_tokens"]) == ("draft_model", "dummy:tiny", 3)
    assert s["draft_tokens"] > 0 and s["acceptance_rate"] == 1.0
    assert s["mean_acceptance_length"] == 4.0 and len(set(s["accepted_per_position"])) == 1
