"""Regenerate the results part of docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/make_docs.py [--results-dir benchmarks/results] [--output docs/benchmarks.md]

Reads every `hopperllm bench ... --output-json` record in the results directory and writes one table per
benchmark kind (the device named in each row), with the budget plots (the PNG beside each budget JSON)
embedded. Only the text between `<!-- results:begin -->` and `<!-- results:end -->` is replaced (the
section is appended when the markers are missing); the hand-written rest of the page stays. JSON files
that are not bench records (kernels.json, ...) are listed by name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {
    "latency": "Latency",
    "throughput": "Throughput",
    "budget": "Response-time budget",
    "serve": "Serving",
    "roofline": "Roofline",
}


def _f(v, fmt: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _ms(stats: dict | None, key: str = "mean") -> str:
    return _f((stats or {}).get(key), ".1f")


def _gpus(rec: dict) -> str:
    """'NVIDIA H200', or '2 x NVIDIA H200 (TP=2)' for a tensor-parallel run."""
    tp = rec.get("tensor_parallel_size") or 1
    return f"{tp} x {rec.get('device')} (TP={tp})" if tp > 1 else str(rec.get("device"))


def _common(rec: dict, name: str) -> list[str]:
    commit = (rec.get("git_commit") or "")[:8] or "-"
    return [
        name,
        rec.get("device") or "-",
        _f(rec.get("gpu_count")),
        _f(rec.get("tensor_parallel_size")),
        f"`{rec.get('model')}`",
        "/".join(str(rec.get(k) or "-") for k in ("dtype", "quantization", "kv_cache_dtype")),
        commit,
    ]


COMMON_HEAD = ["file", "device", "GPUs", "TP", "model", "dtype/quant/KV", "commit"]


def _latency(rec: dict) -> list[str]:
    a, r = rec["args"], rec["results"]
    return [
        f"{a.get('input_len')}/{a.get('output_len')}",
        _f(a.get("batch_size")),
        _ms(r.get("e2e_ms")),
        _ms(r.get("e2e_ms"), "p99"),
        _ms(r.get("ttft_ms")),
        _ms(r.get("tpot_ms"), "mean"),
        _f(r.get("output_tokens_per_s"), ".0f"),
        _f(r.get("speedup_vs_hf")),
        _speculative(rec),
    ]


def _speculative(rec: dict) -> str:
    """`DRAFT K=k, acc%` (or `ngram ...`) for records of speculative runs, else -."""
    spec = rec.get("speculative")
    if not spec:
        return "-"
    who = spec.get("model") or spec.get("method")
    rate = spec.get("acceptance_rate")
    return f"`{who}` K={spec.get('num_speculative_tokens')}, {_f(None if rate is None else 100 * rate, '.0f')}% acc."


def _throughput(rec: dict) -> list[str]:
    r = rec["results"]
    return [
        _f(r.get("num_requests")),
        f"{r.get('total_input_tokens')}/{r.get('total_output_tokens')}",
        _f(r.get("requests_per_second")),
        _f(r.get("output_tokens_per_second"), ".0f"),
        _f(r.get("tokens_per_second"), ".0f"),
        _f(r.get("speedup_vs_hf")),
        _f(
            ((((r.get("gpu_monitor") or {}).get("gpus") or [{}])[0]).get("sm_clock_mhz") or {}).get("mean"),
            ".0f",
        ),
        _f(r.get("output_tokens_per_joule")),
        _f(100 * r["prefix_cache_hit_rate"], ".1f") if r.get("prefix_cache_hit_rate") is not None else "-",
    ]


def _budget(rec: dict) -> list[str]:
    r = rec["results"]
    b1, best = r.get("batch1") or {}, r.get("best_p99")
    where = "-"
    if best:
        where = (
            f"batch {best['batch_size']}" if best["mode"] == "batch" else f"{best['request_rate']:g} req/s"
        )
    return [
        f"{r.get('input_len')}/{r.get('output_len')}",
        _f(r.get("budget_s"), "g"),
        f"{_f(b1.get('queries_per_s'))} ({_f(b1.get('e2e_p99_s'))} s)" if b1 else "-",
        _f(r.get("max_qps_within_budget")),
        where,
    ]


def _natural(path: str) -> list[tuple[int, int | str]]:
    """Sort key with numbers in names compared as numbers: ...-rate4-... before ...-rate16-... ."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p]


def _serve(rec: dict) -> list[str]:
    r = rec["results"]
    return [
        _f(r.get("request_rate")),
        _f(r.get("max_concurrency")),
        f"{r.get('completed')}/{r.get('failed')}",
        _f(r.get("request_throughput")),
        _f(r.get("output_throughput"), ".0f"),
        f"{_f(r.get('mean_ttft_ms'), '.1f')} / {_f(r.get('p99_ttft_ms'), '.1f')}",
        f"{_f(r.get('mean_tpot_ms'), '.1f')} / {_f(r.get('p99_tpot_ms'), '.1f')}",
        f"{_f(r.get('mean_itl_ms'), '.1f')} / {_f(r.get('p99_itl_ms'), '.1f')}",
        _f(r.get("p99_e2el_ms"), ".0f"),
        _f(r.get("request_goodput")),
    ]


def _roofline(rec: dict) -> list[str]:
    r = rec["results"]
    m = r.get("measured") or {}
    pct = (r.get("pct_of_floor") or {}).get("e2e")
    return [
        f"{r.get('input_len')}/{r.get('output_len')}/{r.get('batch_size')}",
        f"{_f(r.get('weight_bytes_per_param'), 'g')}/{_f(r.get('kv_bytes_per_elem'), 'g')}",
        _f(r["ttft_floor_s"] * 1e3, ".1f"),
        _f(r["tpot_floor_s"] * 1e3, ".2f"),
        _f(r["total_s"], ".3f"),
        _f(m.get("e2e_s"), ".3f"),
        _f(pct, ".0f"),
    ]


ROWS = {
    "latency": (
        [
            "in/out",
            "batch",
            "mean e2e ms",
            "p99 e2e ms",
            "mean TTFT ms",
            "mean TPOT ms",
            "out tok/s",
            "vs HF",
            "speculative",
        ],
        _latency,
    ),
    "throughput": (
        [
            "requests",
            "in/out tokens",
            "req/s",
            "out tok/s",
            "total tok/s",
            "vs HF",
            "SM MHz",
            "out tok/J",
            "prefix hit %",
        ],
        _throughput,
    ),
    "budget": (["in/out", "budget s", "batch-1 q/s (p99)", "max q/s within budget (p99)", "at"], _budget),
    "serve": (
        [
            "rate",
            "concurrency",
            "ok/failed",
            "req/s",
            "out tok/s",
            "TTFT ms mean/p99",
            "TPOT ms mean/p99",
            "ITL ms mean/p99",
            "p99 E2EL ms",
            "goodput req/s",
        ],
        _serve,
    ),
    "roofline": (
        [
            "in/out/batch",
            "bytes weight/KV",
            "TTFT floor ms",
            "TPOT floor ms",
            "e2e floor s",
            "measured e2e s",
            "floor/measured %",
        ],
        _roofline,
    ),
}


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def render(results_dir: str, doc_dir: str) -> str:
    records: dict[str, list[tuple[str, dict]]] = {k: [] for k in KINDS}
    others = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json")), key=_natural):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            others.append(name)
            continue
        kind = rec.get("benchmark") if isinstance(rec, dict) else None
        if kind in KINDS and isinstance(rec.get("results"), dict):
            records[kind].append((path, rec))
        else:
            others.append(name)
    lines = [BEGIN, "", "<!-- generated by benchmarks/make_docs.py from benchmarks/results/*.json -->", ""]
    lines += ["## Results", ""]
    for kind, title in KINDS.items():
        lines += [f"### {title}", ""]
        if not records[kind]:
            lines += ["No results yet.", ""]
            continue
        head, fn = ROWS[kind]
        rows = [_common(rec, os.path.basename(p)) + fn(rec) for p, rec in records[kind]]
        lines += _table(COMMON_HEAD + head, rows) + [""]
        if kind == "budget":
            for path, rec in records[kind]:
                png = os.path.splitext(path)[0] + ".png"
                if os.path.isfile(png):
                    rel = os.path.relpath(png, doc_dir).replace(os.sep, "/")
                    lines += [
                        f"![{os.path.basename(png)}: {rec.get('model')} on {_gpus(rec)}]({rel})",
                        "",
                    ]
    if others:
        lines += ["Other result files: " + ", ".join(f"`{n}`" for n in others), ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    section = render(args.results_dir, os.path.dirname(os.path.abspath(args.output)))
    old = open(args.output).read() if os.path.isfile(args.output) else "# Benchmarks\n\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + section + tail
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    with open(args.output, "w") as f:
        f.write(new)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
