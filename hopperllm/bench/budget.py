"""`hopperllm bench budget`: the most queries/s served within a fixed response-time budget.

    hopperllm bench budget --model dummy:llama-2-70b --quantization fp8 --kv-cache-dtype fp8 \
        --input-len 2048 --output-len 128 --budget 2.5 --batch-sizes 1,2,4,8,16,32 \
        --output-json benchmarks/results/budget-70b.json        # also writes budget-70b.csv and .png

NVIDIA's method ("queries/s within 2.5 s response time", Llama-2-70B on H100 with TensorRT-LLM):
run the model at growing load, measure each request's end-to-end latency, and report the highest load
whose latency stays within the budget. Two sweeps, one in-process `LLMEngine` for both:

- batch sweep (closed loop): for each B in `--batch-sizes`, `--num-iters` rounds of B concurrent requests
  (after `--num-iters-warmup` rounds); queries/s = requests / time of the rounds.
- Poisson sweep (open loop): for each rate in `--request-rates`, requests arrive at random times
  (exponential gaps, or gamma with `--burstiness`) in real time: the loop adds each request once its
  arrival time has passed and steps the engine otherwise, so latency includes queueing. Each rate runs
  `--num-prompts` requests, or rate * `--duration` of them. `auto` (the default) picks rates of
  0.5, 0.75, 1, 1.25 and 1.5 times the best batch-sweep queries/s; `none` skips the sweep.

Latency of a request is from its (scheduled) arrival to its last token. A point is within the budget
when its p99 (and, separately, its mean) e2e latency is at most `--budget` seconds.

Files: the JSON (`--output-json`), a CSV of the points and the PNG plot (latency against queries/s,
budget line, batch-1 point, best point), by default beside the JSON with its name and .csv / .png.

`results` in the JSON:
    budget_s, input_len, output_len
    points  [{mode ("batch" | "poisson"), batch_size, request_rate, num_requests, duration_s,
              queries_per_s, e2e_mean_s, e2e_p50_s, e2e_p90_s, e2e_p99_s, ttft_mean_s, ttft_p99_s,
              within_budget_p99, within_budget_mean}, ...]
    best_p99, best_mean    the point of highest queries/s within the budget by p99 / mean (or null)
    max_qps_within_budget  best_p99's queries/s (null when no point meets the budget)
    batch1                 the batch-1 point (null when 1 is not among --batch-sizes)
    csv, plot              paths of the files written (or null)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import numpy as np
from tqdm.auto import tqdm

from hopperllm.bench import common

AUTO_RATE_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5)
CSV_FIELDS = (
    "mode",
    "batch_size",
    "request_rate",
    "num_requests",
    "duration_s",
    "queries_per_s",
    "e2e_mean_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "ttft_mean_s",
    "ttft_p99_s",
    "within_budget_p99",
    "within_budget_mean",
)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from hopperllm.engine.arg_utils import EngineArgs

    p.add_argument("--input-len", type=int, default=2048, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    p.add_argument("--budget", type=float, default=2.5, help="response-time budget, seconds")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="batch sweep: comma-separated sizes")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="batch sweep: warmup rounds per size")
    p.add_argument("--num-iters", type=int, default=3, help="batch sweep: measured rounds per size")
    p.add_argument(
        "--request-rates",
        default="auto",
        help="Poisson sweep: comma-separated req/s, 'auto' (around the batch sweep's best) or 'none'",
    )
    p.add_argument(
        "--num-prompts", type=int, default=None, help="Poisson sweep: requests per rate (default 64)"
    )
    p.add_argument("--duration", type=float, default=None, help="Poisson sweep: seconds of arrivals per rate")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--disable-detokenize", action="store_true", help="skip detokenizing the outputs")
    p.add_argument("--output-json", default=None, help="write the record here (CSV and PNG beside it)")
    p.add_argument("--output-csv", default=None, help="the points as CSV (default: beside --output-json)")
    p.add_argument("--output-plot", default=None, help="the PNG plot (default: beside --output-json)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(enable_prefix_caching=False)


# -- measurement ------------------------------------------------------------------------------
def make_point(mode: str, e2e: list[float], ttft: list[float], duration: float, budget: float, **kw) -> dict:
    p99 = common.percentile(e2e, 99)
    mean = float(np.mean(e2e))
    return {
        "mode": mode,
        "batch_size": kw.get("batch_size"),
        "request_rate": kw.get("request_rate"),
        "num_requests": len(e2e),
        "duration_s": duration,
        "queries_per_s": len(e2e) / duration if duration > 0 else math.inf,
        "e2e_mean_s": mean,
        "e2e_p50_s": common.percentile(e2e, 50),
        "e2e_p90_s": common.percentile(e2e, 90),
        "e2e_p99_s": p99,
        "ttft_mean_s": float(np.mean(ttft)),
        "ttft_p99_s": common.percentile(ttft, 99),
        "within_budget_p99": p99 <= budget,
        "within_budget_mean": mean <= budget,
    }


class _Tracker:
    """Per-request first-token and finish times, from the engine's outputs."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}

    def __call__(self, out, now: float) -> None:
        if out.request_id not in self.first and any(c.token_ids for c in out.outputs):
            self.first[out.request_id] = now
        if out.finished:
            self.done[out.request_id] = now


def run_batch(engine, make_prompts, params, batch_size: int, rounds: int, warmup: int, budget: float) -> dict:
    """Closed loop: `rounds` rounds of `batch_size` concurrent requests."""
    e2e: list[float] = []
    ttft: list[float] = []
    busy = 0.0
    for r in range(warmup + rounds):
        track = _Tracker()
        t0 = time.perf_counter()
        for j, ids in enumerate(make_prompts(batch_size)):
            engine.add_request(f"b{batch_size}-{r}-{j}", {"prompt_token_ids": ids}, params)
        common.run_to_completion(engine, track)
        if r < warmup:
            continue
        busy += max(track.done.values()) - t0
        e2e += [t - t0 for t in track.done.values()]
        ttft += [t - t0 for t in track.first.values()]
    return make_point("batch", e2e, ttft, busy, budget, batch_size=batch_size)


def arrival_times(rng: np.random.Generator, n: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """Arrival offsets (s) of n requests at `rate` req/s: gamma gaps of shape `burstiness`, mean 1/rate
    (exponential, i.e. Poisson arrivals, at burstiness 1), as vLLM's benchmark_serving draws them.
    The first request arrives at 0."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def run_poisson(
    engine, prompts: list[list[int]], params, arrivals: np.ndarray, rate: float, budget: float, tag: str
) -> dict:
    """Open loop in real time: add each request when its arrival time has passed, step otherwise."""
    track = _Tracker()
    arrive_at: dict[str, float] = {}
    n = len(prompts)
    i = 0
    t0 = time.perf_counter()
    mono0 = time.monotonic()
    bar = tqdm(total=n, desc=f"rate {rate:g} req/s", unit="req", leave=False)
    while i < n or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while i < n and arrivals[i] <= now:
            rid = f"{tag}-{i}"
            engine.add_request(
                rid, {"prompt_token_ids": prompts[i]}, params, arrival_time=mono0 + arrivals[i]
            )
            arrive_at[rid] = t0 + arrivals[i]
            i += 1
        if engine.has_unfinished_requests():
            before = len(track.done)
            for out in engine.step():
                track(out, time.perf_counter())
            bar.update(len(track.done) - before)
        elif i < n:
            time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
    bar.close()
    e2e = [track.done[r] - a for r, a in arrive_at.items()]
    ttft = [track.first[r] - a for r, a in arrive_at.items()]
    duration = max(track.done.values()) - t0
    return make_point("poisson", e2e, ttft, duration, budget, request_rate=rate)


def best_point(points: list[dict], key: str) -> dict | None:
    ok = [p for p in points if p[key]]
    return max(ok, key=lambda p: p["queries_per_s"]) if ok else None


def resolve_rates(text: str, batch_points: list[dict]) -> list[float]:
    t = text.strip().lower()
    if t in ("none", ""):
        return []
    if t == "auto":
        ref = best_point(batch_points, "within_budget_p99") or max(
            batch_points, key=lambda p: p["queries_per_s"]
        )
        return [round(ref["queries_per_s"] * f, 4) for f in AUTO_RATE_FACTORS]
    rates = common.parse_float_list(text, "--request-rates")
    if any(r <= 0 for r in rates):
        raise ValueError("--request-rates must be positive (or 'auto' / 'none')")
    return rates


# -- files ------------------------------------------------------------------------------------
def output_paths(args) -> tuple[str | None, str | None]:
    stem = os.path.splitext(args.output_json)[0] if args.output_json else None
    csv_path = args.output_csv or (stem + ".csv" if stem else None)
    png_path = args.output_plot or (stem + ".png" if stem else None)
    return csv_path, png_path


def write_csv(path: str, points: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for p in points:
            w.writerow({k: p[k] for k in CSV_FIELDS})
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> int:
    from hopperllm.bench.plots import plot_budget
    from hopperllm.sampling_params import SamplingParams

    for name in ("input_len", "output_len", "num_iters"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    common.check_positive("--num-prompts", args.num_prompts, allow_none=True)
    if args.budget <= 0:
        raise ValueError("--budget must be positive (seconds)")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive (seconds)")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    batch_sizes = common.parse_int_list(args.batch_sizes, "--batch-sizes")
    t = args.request_rates.strip().lower()
    if t not in ("auto", "none", ""):
        resolve_rates(args.request_rates, [])  # fail on bad rates before loading the model
    csv_path, png_path = output_paths(args)
    common.check_fits(args, args.input_len, args.output_len)

    engine = common.build_engine(args)
    try:
        vocab = common.prompt_vocab_size(engine)
        rng = np.random.default_rng(args.seed)
        params = SamplingParams(
            temperature=0.0,
            ignore_eos=True,
            max_tokens=args.output_len,
            detokenize=not args.disable_detokenize,
        )

        def make_prompts(n: int) -> list[list[int]]:
            return common.random_token_ids(rng, n, args.input_len, vocab)

        fields = common.engine_fields(engine)
        points: list[dict] = []

        def add(point: dict) -> None:
            # Each point is written as it is measured (the record says complete: false until the end), so a
            # run stopped by a time limit keeps what it measured.
            points.append(point)
            partial = {**summarize(args, points), "complete": False}
            common.write_json(
                args.output_json, common.make_record("budget", args, partial, **fields), quiet=True
            )

        for b in tqdm(batch_sizes, desc="Batch sweep", unit="batch size"):
            add(
                run_batch(engine, make_prompts, params, b, args.num_iters, args.num_iters_warmup, args.budget)
            )
        for k, rate in enumerate(
            tqdm(resolve_rates(args.request_rates, points), desc="Poisson sweep", unit="rate")
        ):
            n = args.num_prompts or (max(1, math.ceil(rate * args.duration)) if args.duration else 64)
            arrivals = arrival_times(rng, n, rate, args.burstiness)
            add(run_poisson(engine, make_prompts(n), params, arrivals, rate, args.budget, f"p{k}"))
    finally:
        engine.shutdown()

    device, _ = common.device_info()
    results = {**summarize(args, points), "complete": True}
    if csv_path:
        write_csv(csv_path, points)
        results["csv"] = csv_path
    if png_path:
        tp = fields.get("tensor_parallel_size") or 1
        where = f"{tp}x {device}, TP={tp}" if tp > 1 else device
        title = (
            f"{fields['model']} on {where} ({fields['dtype']}, weights {fields['quantization'] or 'unquantized'},"
            f" KV {fields['kv_cache_dtype']}), {args.input_len} in / {args.output_len} out"
        )
        results["plot"] = plot_budget(points, args.budget, png_path, title, results["best_p99"])
        print(f"wrote {png_path}")
    _print_summary(args, results, fields)
    common.write_json(args.output_json, common.make_record("budget", args, results, **fields))
    return 0


def summarize(args, points: list[dict]) -> dict:
    best_p99, best_mean = best_point(points, "within_budget_p99"), best_point(points, "within_budget_mean")
    return {
        "budget_s": args.budget,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "points": points,
        "best_p99": best_p99,
        "best_mean": best_mean,
        "max_qps_within_budget": best_p99["queries_per_s"] if best_p99 else None,
        "batch1": next((p for p in points if p["mode"] == "batch" and p["batch_size"] == 1), None),
        "csv": None,
        "plot": None,
    }


def _print_summary(args, r: dict, fields: dict) -> None:
    print(
        f"{'mode':<8}{'B':>4}{'rate':>8}{'reqs':>6}{'q/s':>9}{'mean s':>9}{'p99 s':>9}{'ttft p99':>10}  within"
    )
    for p in r["points"]:
        rate = "" if p["request_rate"] is None else f"{p['request_rate']:g}"
        ok = "p99" if p["within_budget_p99"] else ("mean" if p["within_budget_mean"] else "-")
        print(
            f"{p['mode']:<8}{p['batch_size'] or '':>4}{rate:>8}{p['num_requests']:>6}{p['queries_per_s']:>9.3f}"
            f"{p['e2e_mean_s']:>9.3f}{p['e2e_p99_s']:>9.3f}{p['ttft_p99_s']:>10.3f}  {ok}"
        )

    def where(p):
        if p is None:
            return None
        return f"batch {p['batch_size']}" if p["mode"] == "batch" else f"Poisson {p['request_rate']:g} req/s"

    b1, bp, bm = r["batch1"], r["best_p99"], r["best_mean"]
    rows = [
        ("Model", fields["model"]),
        ("Input / output len", f"{args.input_len} / {args.output_len}"),
        ("Budget (s)", args.budget),
        ("Batch-1 queries/s", b1["queries_per_s"] if b1 else None),
        ("Batch-1 p99 e2e (s)", b1["e2e_p99_s"] if b1 else None),
        ("Max queries/s within budget (p99)", bp["queries_per_s"] if bp else None),
        ("  at", where(bp)),
        ("Max queries/s within budget (mean)", bm["queries_per_s"] if bm else None),
        ("  at", where(bm)),
    ]
    common.print_table("Response-Time Budget Result", rows)
