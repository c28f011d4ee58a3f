"""`hopperllm bench throughput`: offline throughput, every prompt submitted at once.

    hopperllm bench throughput --model dummy:llama-3-8b --quantization fp8 \
        --input-len 1024 --output-len 256 --num-prompts 1000 --output-json benchmarks/results/throughput.json

Prompts are `--num-prompts` random token-id prompts of `--input-len` (each with `--output-len`; after
`--prefix-len` random tokens all of them share, as vLLM's random dataset builds them), the
rows of `--dataset` (JSONL: "prompt" text or "prompt_token_ids", optional "output_len"; `--output-len`
when a row has none), or with `--dataset-name sharegpt` ShareGPT's conversations as vLLM samples them
(bench/datasets.py: the first turn is the prompt, the second turn's length the output's, or `--output-len`
for every request, as vLLM's `bench throughput` takes it). All go to the engine at once, as `LLM.generate` does, and run as one continuous
batch (greedy, `ignore_eos`). One short request runs first to warm up (compile and allocate), untimed.

`results` in the JSON:
    elapsed_time, num_requests, total_num_tokens, requests_per_second, tokens_per_second  (vLLM's keys)
    total_input_tokens, total_output_tokens, input_tokens_per_second, output_tokens_per_second
    baseline (with --baseline hf)   {name, hf_dtype, max_batch_size, elapsed_time, requests_per_second,
                                     output_tokens_per_second, tokens_per_second}
    speedup_vs_hf                   our total tokens/s / HF's (above 1: we are faster)
    gpu_monitor                     the GPUs' SM / memory clocks, power, temperature and throttle reasons
                                    over the timed part, sampled every 0.5 s, and the energy they used
                                    (bench/gpu_monitor.py); None without NVML
    prefix_cache_hit_rate           the prompt tokens the prefix cache served, of those admitted in the timed run
    energy_j, output_tokens_per_joule   the GPUs' energy over the timed part (NVML's counter) and the output
                                    tokens it bought; None without the counter. A throughput run can sit at
                                    the GPU's power limit (perf-notes v29), where tokens a joule is the bound
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hopperllm.bench import common, datasets, gpu_monitor
from hopperllm.worker.jit_watch import JitWatch


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from hopperllm.engine.arg_utils import EngineArgs

    p.add_argument("--input-len", type=int, default=None, help="random prompts: tokens each (default 1024)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    p.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="random prompts: this many random tokens shared by every prompt before its --input-len own "
        "(a prefix-caching workload, vLLM's flag)",
    )
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to run")
    p.add_argument(
        "--dataset", "--dataset-path", dest="dataset", default=None, help="JSONL prompts, or ShareGPT's JSON"
    )
    p.add_argument(
        "--dataset-name",
        choices=["random", "jsonl", "sharegpt"],
        default=None,
        help="random prompts, the JSONL of --dataset (the default when it is given) or ShareGPT's JSON",
    )
    p.add_argument("--n", type=int, default=1, help="sequences per request (SamplingParams.n)")
    p.add_argument("--disable-detokenize", action="store_true", help="skip detokenizing the outputs")
    p.add_argument("--baseline", choices=["hf"], default=None, help="also time HF transformers' generate")
    p.add_argument("--hf-max-batch-size", type=int, default=16, help="batch size of the HF baseline")
    p.add_argument("--output-json", default=None, help="write the record (env, args, figures) here")
    EngineArgs.add_cli_args(p)


def make_requests(args, engine, rng: np.random.Generator) -> list[tuple[dict, int]]:
    """[(prompt, output_len)] from --dataset, or random token ids."""
    out_default = args.output_len or 128
    name = dataset_name(args)
    if name == "sharegpt":
        pairs = datasets.load_sharegpt(args.dataset, args.seed)
        encoded: dict[str, list[int]] = {}  # each text tokenized once: counted, then a kept prompt's ids

        def count(texts):
            for t in texts:
                if t not in encoded:
                    encoded[t] = engine.tokenizer.encode(t)
            return [len(encoded[t]) for t in texts]

        rows = datasets.sample_sharegpt(pairs, args.num_prompts, count, args.output_len)
        return [({"prompt": r.prompt, "prompt_token_ids": encoded[r.prompt]}, r.output_len) for r in rows]
    if name == "jsonl":
        rows = common.take(common.read_dataset(args.dataset), args.num_prompts)
        reqs = []
        for row in rows:
            if "prompt_token_ids" in row:
                prompt = {"prompt_token_ids": list(row["prompt_token_ids"])}
            else:
                prompt = {"prompt": row["prompt"], "prompt_token_ids": engine.tokenizer.encode(row["prompt"])}
            reqs.append((prompt, int(row.get("output_len", out_default))))
        return reqs
    input_len = args.input_len or 1024
    common.check_positive("--input-len", input_len)
    vocab = common.prompt_vocab_size(engine)
    prefix = common.random_token_ids(rng, 1, args.prefix_len, vocab)[0] if args.prefix_len else []
    ids = common.random_token_ids(rng, args.num_prompts, input_len, vocab)
    return [({"prompt_token_ids": prefix + p}, out_default) for p in ids]


def dataset_name(args) -> str:
    """--dataset-name, checked against --dataset and the flags of the other kinds."""
    name = datasets.resolve_name(args.dataset_name, args.dataset)
    if name != "random" and (args.input_len is not None or args.prefix_len):
        raise ValueError("--input-len and --prefix-len are for random prompts: drop them or --dataset")
    return name


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hopperllm.sampling_params import RequestOutputKind, SamplingParams

    common.check_positive("--num-prompts", args.num_prompts)
    common.check_positive("--output-len", args.output_len, allow_none=True)
    common.check_positive("--n", args.n)
    if args.prefix_len < 0:
        raise ValueError("--prefix-len must not be negative")
    if dataset_name(args) == "random":
        common.check_fits(args, args.input_len or 1024, args.output_len or 128, args.prefix_len)
    engine = common.build_engine(args)
    try:
        rng = np.random.default_rng(args.seed)
        reqs = make_requests(args, engine, rng)

        def params(n_out: int) -> SamplingParams:
            return SamplingParams(
                n=args.n,
                temperature=0.0,
                ignore_eos=True,
                max_tokens=n_out,
                detokenize=not args.disable_detokenize,
                # only finished requests are counted: as vLLM's benchmark (LLM.generate), the engine builds
                # no output objects before
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        # validate everything before the clock starts, so a bad row fails fast and nothing is half-added
        prepared = [engine.prepare_request(f"tp-{i}", p, params(n)) for i, (p, n) in enumerate(reqs)]
        warm_len = min(16, len(reqs[0][0]["prompt_token_ids"]))
        engine.add_request(
            "warmup", {"prompt_token_ids": reqs[0][0]["prompt_token_ids"][:warm_len]}, params(4)
        )
        common.run_to_completion(engine)

        bar = tqdm(total=len(prepared), desc="Processed prompts", unit="req")
        n_in = n_out = 0

        def seen(out, now):
            nonlocal n_in, n_out
            if out.finished:
                n_in += len(out.prompt_token_ids)
                n_out += sum(len(c.token_ids) for c in out.outputs)
                bar.update(1)

        bm = engine.scheduler.block_manager
        queries0, hits0 = bm.prefix_cache_queries, bm.prefix_cache_hits
        with JitWatch() as jit, gpu_monitor.GpuMonitor() as monitor:
            t0 = time.perf_counter()
            for req in prepared:
                engine.commit_request(req)
            common.run_to_completion(engine, seen)
            elapsed = time.perf_counter() - t0
        bar.close()
        queries, hits = bm.prefix_cache_queries - queries0, bm.prefix_cache_hits - hits0
        fields = common.engine_fields(engine)
        dtype, device = engine.config.dtype, engine.config.device
        prompt_ids = [r.prompt_token_ids for r in prepared]
    finally:
        engine.shutdown()
    total = n_in + n_out
    results = {
        "elapsed_time": elapsed,
        "num_requests": len(prepared),
        "total_num_tokens": total,
        "requests_per_second": len(prepared) / elapsed,
        "tokens_per_second": total / elapsed,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "input_tokens_per_second": n_in / elapsed,
        "output_tokens_per_second": n_out / elapsed,
        # prompt tokens the prefix cache served over those looked up when the run's requests were admitted
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        # Triton kernel variants first met inside the timed run (compiled or loaded from the disk cache); with
        # tensor parallelism every rank runs in its own process, out of this one's sight: None
        "jit_compiles_during_run": jit.summary() if fields["tensor_parallel_size"] == 1 else None,
        # the GPUs' clocks, power and throttle reasons over the timed run (None without NVML)
        "gpu_monitor": monitor.summary(),
    }
    energy = gpu_monitor.total_energy_j(results["gpu_monitor"])
    results["energy_j"] = energy
    results["output_tokens_per_joule"] = n_out / energy if energy else None
    del engine
    common.free_memory()
    if args.baseline == "hf":
        results["baseline"] = _hf_baseline(args, dtype, device, prompt_ids, [n for _, n in reqs])
        results["speedup_vs_hf"] = results["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    _print_summary(results, fields)
    common.write_json(args.output_json, common.make_record("throughput", args, results, **fields))
    return 0


def _hf_baseline(args, dtype, device, prompts: list[list[int]], output_lens: list[int]) -> dict:
    from hopperllm.bench import hf_baseline

    common.check_positive("--hf-max-batch-size", args.hf_max_batch_size)
    model = hf_baseline.load_hf_model(args.model, dtype, device)
    # HF has no n: each of a request's n sequences is its own row
    prompts = [p for p in prompts for _ in range(args.n)]
    output_lens = [n for n in output_lens for _ in range(args.n)]
    hf_baseline.generate_timed(model, [prompts[0][:16]], 4)  # warm up, untimed
    elapsed, n_in, n_out = hf_baseline.hf_throughput(model, prompts, output_lens, args.hf_max_batch_size)
    del model
    n_in //= args.n  # each prompt counts once, as ours do
    return {
        "name": "hf",
        "hf_dtype": str(dtype).removeprefix("torch."),
        "max_batch_size": args.hf_max_batch_size,
        "elapsed_time": elapsed,
        "requests_per_second": len(prompts) / args.n / elapsed,
        "output_tokens_per_second": n_out / elapsed,
        "tokens_per_second": (n_in + n_out) / elapsed,
    }


def _print_summary(r: dict, fields: dict) -> None:
    rows: list[tuple[str, object]] = [
        ("Model", fields["model"]),
        (
            "dtype / quantization / KV cache",
            f"{fields['dtype']} / {fields['quantization']} / {fields['kv_cache_dtype']}",
        ),
        ("Requests", r["num_requests"]),
        ("Duration (s)", r["elapsed_time"]),
        ("Total input tokens", r["total_input_tokens"]),
        ("Total generated tokens", r["total_output_tokens"]),
        ("Request throughput (req/s)", r["requests_per_second"]),
        ("Input token throughput (tok/s)", r["input_tokens_per_second"]),
        ("Output token throughput (tok/s)", r["output_tokens_per_second"]),
        ("Total token throughput (tok/s)", r["tokens_per_second"]),
        ("Prefix cache hit rate (%)", 100 * r["prefix_cache_hit_rate"]),
        ("Triton kernels compiled during the run", (r["jit_compiles_during_run"] or {}).get("count", "n/a")),
    ]
    if clocks := gpu_monitor.describe(r["gpu_monitor"]):
        rows.append(("GPU 0 clock, power, throttling", clocks))
    if r.get("energy_j"):
        rows.append(
            ("GPU energy (J), output tokens / J", f"{r['energy_j']:.0f}, {r['output_tokens_per_joule']:.2f}")
        )
    if "baseline" in r:
        b = r["baseline"]
        rows.append(("-- HF transformers baseline (static cache) --", None))
        rows += [
            ("HF batch size", b["max_batch_size"]),
            ("HF request throughput (req/s)", b["requests_per_second"]),
            ("HF output token throughput (tok/s)", b["output_tokens_per_second"]),
            ("HF total token throughput (tok/s)", b["tokens_per_second"]),
            ("Speedup vs HF (x)", r["speedup_vs_hf"]),
        ]
    common.print_table("Throughput Benchmark Result", rows)
