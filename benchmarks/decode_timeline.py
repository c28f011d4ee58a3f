"""Where does a decode step's time go between and inside our kernels, in the model's CUDA graph? The FP8
GEMVs and the decode attention write %globaltimer at their programs' phases (kernels/timeline.py); this
script runs steady-state decode steps of the engine and reads the stamps of the graph's last replay.

    python benchmarks/decode_timeline.py --model dummy:llama-2-7b --batch-size 1 --output-json out.json

Per launch, in graph order: its release (the first program past the PDL wait, i.e. when the kernel before
it had finished), its last program's end, the programs already resident at the release, and the median
program's phases. Per kernel kind: the median time from release to last end ("busy") and from the last end
to the next instrumented kernel's release ("handoff": the launch boundary plus any uninstrumented kernel
between, e.g. a norm). Decode attention's phases: q / rotary / new K-V store, the key loop, the slice's
partial store + arrival, the merge (last slice of a kv head), the quantizing tail (last kv head of a row).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script
from _setup import add_decode_args, decode_llm, start_decodes

from hopperllm.kernels import timeline


def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def launch_row(rec: dict) -> dict:
    """One launch's stamps -> its release, end (ns) and program phase medians (us)."""
    t = rec["ts"].cpu().tolist()
    t = [r for r in t if r[0]]  # programs that ran (all of them, unless a launch exited early)
    release = min(r[1] for r in t)
    ends = [max(r[1:7]) for r in t]
    row = {
        "kernel": rec["kernel"],
        **{k: rec[k] for k in ("M", "N", "K", "gated", "split_k", "batch", "kv_heads", "splits") if k in rec},
        "programs": len(t),
        "sms": len({r[7] for r in t}),
        "first_start": min(r[0] for r in t),
        "release": release,
        "end": max(ends),
        "resident_at_release": sum(r[0] <= release for r in t),
        "release_spread_us": (max(r[1] for r in t) - release) / 1e3,
        "busy_us": (max(ends) - release) / 1e3,
        "program_us": med((e - r[1]) / 1e3 for e, r in zip(ends, t, strict=True)),
    }
    if rec["kernel"] == "decode_attention":
        row.update(
            q_ready_us=med((r[2] - r[1]) / 1e3 for r in t),
            loop_us=med((r[3] - r[2]) / 1e3 for r in t),
            arrive_us=med((r[4] - r[3]) / 1e3 for r in t),
            merge_us=med((r[5] - r[4]) / 1e3 for r in t if r[5]),
            quant_us=med((r[6] - r[5]) / 1e3 for r in t if r[6] and r[5]),
        )
    elif rec["kernel"] == "fp8_gemv":  # the stream-K kernel stamps only its start, release and end
        row.update(
            main_us=med((r[2] - r[1]) / 1e3 for r in t if r[2]),
            fixup_us=med((r[4] - r[3]) / 1e3 for r in t if r[4]),
        )
    return row


def main():
    p = argparse.ArgumentParser()
    add_decode_args(p)
    a = p.parse_args()
    timeline.RECORDS = []
    llm = decode_llm(a, a.batch_size, a.gpu_memory_utilization)
    eng = llm.engine
    start_decodes(eng, a.batch_size, a.context)
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    recs = [r for r in timeline.RECORDS if r["captured"]]
    # the graph this batch replays: the smallest captured decode batch >= batch_size
    graph_batch = min(
        r["batch"] for r in recs if r["kernel"] == "decode_attention" and r["batch"] >= a.batch_size
    )
    layers = eng.config.model_config.num_hidden_layers
    # the graph's launches: from its first decode-attention record back to the GEMV before it (its QKV), and
    # every record up to its last decode attention's o_proj, down and the next layers' launches
    idx = [i for i, r in enumerate(recs) if r["kernel"] == "decode_attention" and r["batch"] == graph_batch]
    idx = idx[-layers:]
    per_layer = (idx[-1] - idx[0]) // (layers - 1) if layers > 1 else len(recs)
    # the QKV GEMV before the first layer's attention, when the GEMVs run at this batch (not cuBLAS)
    first = idx[0] - 1 if idx[0] > 0 and recs[idx[0] - 1].get("M") == graph_batch else idx[0]
    last = min(idx[-1] + max(per_layer - 1, 1), len(recs))
    rows = [launch_row(r) for r in recs[first:last]]
    t0 = rows[0]["release"]
    for i, row in enumerate(rows):
        nxt = rows[i + 1]["release"] if i + 1 < len(rows) else None
        row["handoff_us"] = (nxt - row["end"]) / 1e3 if nxt is not None else None
        for k in ("first_start", "release", "end"):
            row[k] = (row[k] - t0) / 1e3  # us from the first release
    kinds = defaultdict(list)
    for i, row in enumerate(rows):
        kinds[f"{i % per_layer}:{row['kernel']}"].append(row)
    summary = {}
    for k, rs in kinds.items():
        keys = [x for x in rs[0] if x.endswith("_us") or x in ("programs", "sms", "resident_at_release")]
        summary[k] = {x: med(r[x] for r in rs if r.get(x) is not None) for x in keys}
        summary[k].update({x: rs[0][x] for x in ("M", "N", "K", "gated", "split_k", "splits") if x in rs[0]})
    stamps = torch.tensor(
        sorted({v for r in recs[first:last] for v in r["ts"][:, :7].flatten().tolist() if v})
    )
    span = rows[-1]["end"] - rows[0]["release"]
    res = {
        "model": a.model,
        "batch_size": a.batch_size,
        "graph_batch": graph_batch,
        "context": a.context,
        "launches_per_layer": per_layer,
        "span_us": span,
        "span_per_layer_us": span / layers,
        "timer_step_ns": float(stamps.diff().min()) if stamps.numel() > 1 else None,
        "per_launch_kind": summary,
        "launches": rows,
    }
    print(f"{a.model} batch {a.batch_size} (graph {graph_batch}): {len(rows)} launches, {per_layer} a layer, "
          f"{span:.1f} us first release -> last end ({span / layers:.2f} a layer), timer step {res['timer_step_ns']} ns")  # fmt: skip
    for k, v in summary.items():
        print(
            f"  {k:<24} "
            + " ".join(f"{x}={y:.2f}" if isinstance(y, float) else f"{x}={y}" for x, y in v.items())
        )
    res["kernel_resources"] = kernel_resources()
    for r in res["kernel_resources"]:
        print("  " + " ".join(f"{k}={v}" for k, v in r.items()))
    emit(res, a.output_json)


def kernel_resources() -> list[dict]:
    """Registers, shared memory and warps of every compiled variant of the instrumented kernels and the norms:
    what decides whether the next kernel's programs fit on an SM beside the running ones."""
    from hopperllm.kernels import norm
    from hopperllm.kernels import paged_attention as pa
    from hopperllm.kernels.fp8 import _fp8_gemv_kernel, _fp8_gemv_stream_k_kernel

    fns = {"fp8_gemv": _fp8_gemv_kernel, "fp8_gemv_stream_k": _fp8_gemv_stream_k_kernel,
           "decode_attention": pa._decode_split_kernel}  # fmt: skip
    fns.update({n: f for n, f in vars(norm).items() if n.startswith("_") and hasattr(f, "device_caches")})
    rows = []
    for name, fn in fns.items():
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for k in list(cache.values()):
                try:
                    k._init_handles()
                    md = k.metadata
                    rows.append({"kernel": name, "regs": k.n_regs, "spills": k.n_spills, "shared": md.shared,
                                 "warps": md.num_warps, "stages": md.num_stages})  # fmt: skip
                except Exception as e:  # noqa: BLE001 (another Triton's cache layout: report, do not fail)
                    rows.append({"kernel": name, "error": repr(e)[:120]})
    return rows


if __name__ == "__main__":
    main()
