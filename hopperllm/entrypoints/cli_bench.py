"""`hopperllm bench {latency,throughput,budget,serve,roofline}`: each lives in `hopperllm/bench/<name>.py`
with `add_cli_args(parser)` and `main(args) -> int`. See docs/benchmarks.md for what each measures."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "latency": "latency of one batch: end-to-end, time to first token, time per output token",
    "throughput": "offline throughput: all prompts at once through continuous batching",
    "budget": "queries/s within a fixed response-time budget (batch sweep + Poisson load), with a plot",
    "serve": "an OpenAI-compatible endpoint under load: TTFT, TPOT, ITL, E2EL percentiles, goodput",
    "roofline": "the bandwidth/compute floor of a model and shape on a Hopper GPU",
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (latency, throughput, budget, serve, roofline)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, help_text in BENCHMARKS.items():
        mod = importlib.import_module(f"hopperllm.bench.{name}")
        bp = bsub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).split("\n\n")[0])
        mod.add_cli_args(bp)
        bp.set_defaults(func=mod.main)
