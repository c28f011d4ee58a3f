"""`hopperllm bench latency`: the latency of one batch of random prompts, iteration after iteration.

    hopperllm bench latency --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8 \
        --input-len 2048 --output-len 128 --batch-size 1 --output-json benchmarks/results/latency.json

Each iteration submits `--batch-size` fresh random prompts of `--input-len` token ids (`ignore_eos`,
greedy, `max_tokens = --output-len`, `n = --n`) straight to an `LLMEngine` and steps it until all are
done, timestamping every step. Per iteration:

- e2e: submit until the last sequence finishes;
- TTFT: submit until every request of the batch has its first output token (the batch's prefill);
- TPOT: (e2e - TTFT) / (output_len - 1), the time per decode step after the first token.

Prefix caching is off by default (`--enable-prefix-caching` turns it on), and every iteration's
prompts are new, so no iteration reuses another's KV cache.

`results` in the JSON:
    avg_latency, latencies, percentiles {"10","25","50","75","90","99"}   (seconds; vLLM's keys)
    e2e_ms, ttft_ms, tpot_ms        {mean, median, std, p50, p90, p99} in milliseconds
    iterations                      [{e2e_s, ttft_s, tpot_s}, ...]
    output_tokens_per_s             batch_size * n * output_len / mean e2e
    baseline (with --baseline hf)   {name, hf_dtype, avg_latency, latencies, e2e_ms, ttft_ms, tpot_ms}
    speedup_vs_hf                   HF mean e2e / ours (above 1: we are faster)
    gpu_monitor                     the GPUs' SM / memory clocks, power, temperature and throttle reasons
                                    over the timed part, sampled every 0.5 s, and the energy they used
                                    (bench/gpu_monitor.py); None without NVML
    energy_j, joules_per_request    the GPUs' energy over the timed iterations (NVML's counter) and its
                                    share a request (batch_size * n sequences an iteration); None without it
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm.auto import tqdm

from hopperllm.bench import common, gpu_monitor


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from hopperllm.engine.arg_utils import EngineArgs

    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="requests per iteration")
    p.add_argument("--n", type=int, default=1, help="sequences per request (SamplingParams.n)")
    p.add_argument("--num-iters-warmup", type=int, default=10, help="iterations run before measuring")
    p.add_argument("--num-iters", type=int, default=30, help="measured iterations")
    p.add_argument("--disable-detokenize", action="store_true", help="skip detokenizing the outputs")
    p.add_argument("--baseline", choices=["hf"], default=None, help="also time HF transformers' generate")
    p.add_argument("--output-json", default=None, help="write the record (env, args, figures) here")
    EngineArgs.add_cli_args(p)
    p.set_defaults(enable_prefix_caching=False)


def _check(args) -> None:
    for name in ("input_len", "output_len", "batch_size", "n", "num_iters"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must not be negative")


def run_iteration(engine, prompts: list[list[int]], params, tag: str) -> dict[str, float]:
    """Submit `prompts` at once, step to completion: {e2e_s, ttft_s, tpot_s} (tpot None at 1 token)."""
    first: dict[str, float] = {}
    done: dict[str, float] = {}

    def seen(out, now):
        if out.request_id not in first and any(c.token_ids for c in out.outputs):
            first[out.request_id] = now
        if out.finished:
            done[out.request_id] = now

    t0 = time.perf_counter()
    for j, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{j}", {"prompt_token_ids": ids}, params)
    common.run_to_completion(engine, seen)
    e2e = max(done.values()) - t0
    ttft = max(first.values()) - t0
    n_out = params.max_tokens
    tpot = (e2e - ttft) / (n_out - 1) if n_out > 1 else None
    return {"e2e_s": e2e, "ttft_s": ttft, "tpot_s": tpot}


def summarize_iterations(iters: list[dict[str, float]]) -> dict:
    e2e = [it["e2e_s"] for it in iters]
    ttft = [it["ttft_s"] for it in iters]
    tpot = [it["tpot_s"] for it in iters if it["tpot_s"] is not None]
    return {
        "avg_latency": float(np.mean(e2e)),
        "latencies": e2e,
        "percentiles": {str(p): common.percentile(e2e, p) for p in (10, 25, 50, 75, 90, 99)},
        "e2e_ms": common.summarize(e2e, scale=1e3),
        "ttft_ms": common.summarize(ttft, scale=1e3),
        "tpot_ms": common.summarize(tpot, scale=1e3),
        "iterations": iters,
    }


def main(args: argparse.Namespace) -> int:
    from hopperllm.sampling_params import SamplingParams

    _check(args)
    common.check_fits(args, args.input_len, args.output_len)
    engine = common.build_engine(args)
    try:
        vocab = common.prompt_vocab_size(engine)
        params = SamplingParams(
            n=args.n,
            temperature=0.0,
            ignore_eos=True,
            max_tokens=args.output_len,
            detokenize=not args.disable_detokenize,
        )
        rng = np.random.default_rng(args.seed)

        def batch():
            return common.random_token_ids(rng, args.batch_size, args.input_len, vocab)

        for i in tqdm(
            range(args.num_iters_warmup), desc="Warmup iterations", disable=not args.num_iters_warmup
        ):
            run_iteration(engine, batch(), params, f"warmup-{i}")
        with gpu_monitor.GpuMonitor() as monitor:  # clocks, power and throttling over the timed iterations
            iters = [
                run_iteration(engine, batch(), params, f"iter-{i}")
                for i in tqdm(range(args.num_iters), desc="Profiling iterations")
            ]
        fields = common.engine_fields(engine)
        dtype = engine.config.dtype
        device = engine.config.device
    finally:
        engine.shutdown()
    results = summarize_iterations(iters)
    results["output_tokens_per_s"] = args.batch_size * args.n * args.output_len / results["avg_latency"]
    results["gpu_monitor"] = monitor.summary()
    energy = gpu_monitor.total_energy_j(results["gpu_monitor"])
    results["energy_j"] = energy
    results["joules_per_request"] = energy / (args.num_iters * args.batch_size * args.n) if energy else None
    del engine
    common.free_memory()
    if args.baseline == "hf":
        results["baseline"] = _hf_baseline(args, dtype, device, vocab)
        results["speedup_vs_hf"] = results["baseline"]["avg_latency"] / results["avg_latency"]
    _print_summary(args, results, fields)
    common.write_json(args.output_json, common.make_record("latency", args, results, **fields))
    return 0


def _hf_baseline(args, dtype, device: str, vocab: int) -> dict:
    from hopperllm.bench import hf_baseline

    model = hf_baseline.load_hf_model(args.model, dtype, device)
    rng = np.random.default_rng(args.seed + 1)
    prompts_per_iter = args.batch_size * args.n  # HF has no n: run every sequence as its own row

    def run():
        prompts = common.random_token_ids(rng, prompts_per_iter, args.input_len, vocab)
        e2e, ttft, _ = hf_baseline.generate_timed(model, prompts, args.output_len)
        tpot = (e2e - ttft) / (args.output_len - 1) if args.output_len > 1 else None
        return {"e2e_s": e2e, "ttft_s": ttft, "tpot_s": tpot}

    for _ in tqdm(range(args.num_iters_warmup), desc="HF warmup", disable=not args.num_iters_warmup):
        run()
    iters = [run() for _ in tqdm(range(args.num_iters), desc="HF iterations")]
    out = summarize_iterations(iters)
    out = {"name": "hf", "hf_dtype": str(dtype).removeprefix("torch."), **out}
    return out


def _print_summary(args, r: dict, fields: dict) -> None:
    rows: list[tuple[str, object]] = [
        ("Model", fields["model"]),
        (
            "dtype / quantization / KV cache",
            f"{fields['dtype']} / {fields['quantization']} / {fields['kv_cache_dtype']}",
        ),
        (
            "Input / output len, batch size, n",
            f"{args.input_len} / {args.output_len}, {args.batch_size}, {args.n}",
        ),
        ("Iterations", args.num_iters),
        ("Output tokens/s (mean e2e)", r["output_tokens_per_s"]),
    ]
    if spec := fields.get("speculative"):
        rate = spec["acceptance_rate"]
        rows.append(
            (
                "Speculative drafts accepted",
                f"{spec['accepted_tokens']} of {spec['draft_tokens']}"
                + (f" ({100 * rate:.1f}%)" if rate is not None else ""),
            )
        )
        if spec["mean_acceptance_length"] is not None:
            rows.append(("Mean acceptance length", spec["mean_acceptance_length"]))
    if clocks := gpu_monitor.describe(r["gpu_monitor"]):
        rows.append(("GPU 0 clock, power, throttling", clocks))
    if r.get("energy_j"):
        rows.append(("GPU energy (J), J a request", f"{r['energy_j']:.0f}, {r['joules_per_request']:.1f}"))
    for key, title in (
        ("e2e_ms", "End-to-end latency"),
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st)"),
    ):
        s = r[key]
        name = key.split("_")[0].upper()
        rows.append((f"-- {title} --", None))
        rows += [
            (f"Mean {name} (ms)", s["mean"]),
            (f"P50 {name} (ms)", s["p50"]),
            (f"P90 {name} (ms)", s["p90"]),
            (f"P99 {name} (ms)", s["p99"]),
        ]
    if "baseline" in r:
        b = r["baseline"]
        rows.append(("-- HF transformers baseline (static cache) --", None))
        rows += [
            ("HF mean E2E (ms)", b["e2e_ms"]["mean"]),
            ("HF mean TTFT (ms)", b["ttft_ms"]["mean"]),
            ("HF mean TPOT (ms)", b["tpot_ms"]["mean"]),
            ("Speedup vs HF (x)", r["speedup_vs_hf"]),
        ]
    common.print_table("Latency Benchmark Result", rows)
