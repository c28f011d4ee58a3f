"""The throughput run's main operations at a steady-state mixed step's shapes, each run back to back for some
seconds: the rate right after a warm-up (the clock at its maximum) against the rate once the GPU sits at its
power limit, with the SM clock, the power and the energy a call (NVML's energy counter, read by GpuMonitor's start / stop).

Why: the Llama-3-8B 1000 x 2048/128 run holds its GPU at the 700 W limit (perf-notes v29: SM clock ~1,560 MHz of
1,980, `sw_power_cap` 92% of the samples). A floor taken from a short burst of FP8 GEMMs assumes 1,980 MHz; under
the cap the floor is energy over the power limit.

    python benchmarks/power_floor.py [--seconds 6] [--m 8192] [--output-json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _setup import decode_problem, prefill_problem  # benchmarks/ is on sys.path when run as a script

from hopperllm.bench import common
from hopperllm.bench.gpu_monitor import GpuMonitor
from hopperllm.kernels import fp8
from hopperllm.kernels import paged_attention as pa

# Llama-3-8B, one layer: (N, K) of the FP8 projections; heads
GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
HQ, HKV, D = 32, 8, 128


def fp8_operand(rows: int, cols: int, std: float) -> torch.Tensor:
    """e4m3 codes with a spread of `std` code units: 112 is what a per-row absmax scale leaves a Gaussian row
    (and the dummy weights' init); 1 is torch.randn cast straight to e4m3 (bench_scaled_mm_m's operands)."""
    return (torch.randn(rows, cols, device="cuda") * std).clamp_(-448, 448).to(torch.float8_e4m3fn)


def gemm_layer(m: int, std: float, fast_accum: bool):
    """The layer's four FP8 GEMMs as the model runs them (fp8.scaled_mm: row-wise scales; fast accumulation
    for K <= FAST_ACCUM_MAX_K, as the 8B's all are) or with float32 promotion (`fast_accum` False: torch's
    default, which v29's first measurement used)."""
    ops = []
    for n, k in GEMMS.values():
        x, w = fp8_operand(m, k, std), fp8_operand(n, k, std)
        sx, sw = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
        ops.append((x, w, sx, sw))

    def run():
        saved = fp8.FP8_FAST_ACCUM
        fp8.FP8_FAST_ACCUM = fast_accum
        try:
            for x, w, sx, sw in ops:
                fp8.scaled_mm(x, sx, w, sw, torch.bfloat16)
        finally:
            fp8.FP8_FAST_ACCUM = saved

    flops = sum(2 * m * n * k for n, k in GEMMS.values())
    return run, {"tflop": flops / 1e12}


def decode_attention(batch: int, ctx: int):
    dp = decode_problem(batch, ctx, HQ, HKV, D)
    splits = pa.choose_num_splits(batch, HKV, ctx, dp.q.device)

    def run():
        pa.paged_decode_attention(dp.q, dp.cache[0], dp.cache[1], dp.tables, dp.seq_lens, 0.088, dp.one, dp.one,
                                  num_splits=splits)  # fmt: skip

    return run, {"gb": dp.kv_bytes / 1e9}


def prefill_attention(batch: int, ctx: int):
    p = prefill_problem(batch, ctx, HQ, HKV, D)

    def run():
        pa.paged_prefill_attention(p.q, p.cache[0], p.cache[1], p.cu, p.seq_lens, p.tables, ctx, 0.088,
                                   k_scale=p.one, v_scale=p.one)  # fmt: skip

    return run, {"tflop": p.flops / 1e12}


def copy(gb: float):
    """A device-to-device copy of `gb` GB: the energy of streaming bytes with no work on them (read + write)."""
    src = torch.empty(int(gb * 1e9), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)

    return run, {"gb": 2 * src.numel() / 1e9}


def timed_calls(fn, calls: int) -> float:
    """Seconds a call, over `calls` back-to-back calls timed with CUDA events."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / 1e3 / calls


def measure(name: str, fn, work: dict, seconds: float) -> dict:
    for _ in range(3):  # compile, allocate
        fn()
    torch.cuda.synchronize()
    time.sleep(1.0)  # idle: the power average falls, the next calls start at the top clock
    timed_calls(fn, 3)
    burst = timed_calls(fn, 10)
    # back to back: chunks of ~50 ms, the last half of the run counted as the sustained state
    chunk = max(1, int(0.05 / burst))
    t_end = time.perf_counter() + seconds
    t_half = time.perf_counter() + seconds / 2
    times, calls, counting = [], 0, False
    mon = GpuMonitor(interval_s=0.1)
    while not counting or time.perf_counter() < t_end:  # at least one chunk in the counted half
        if not counting and time.perf_counter() >= t_half:
            torch.cuda.synchronize()
            mon.start()  # the energy counter is read here and at stop()
            t0, counting = time.perf_counter(), True
        per_call = timed_calls(fn, chunk)
        if counting:
            times.append(per_call)
            calls += chunk
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    mon.stop()
    summary = mon.summary()
    gpu = summary["gpus"][0] if summary else {}
    energy = gpu.get("energy_j")
    sustained = sorted(times)[len(times) // 2]
    row = {
        "op": name,
        **work,
        "burst_ms": burst * 1e3,
        "sustained_ms": sustained * 1e3,
        "slowdown": sustained / burst,
        "sm_clock_mhz": (gpu.get("sm_clock_mhz") or {}).get("mean"),
        "power_w": (gpu.get("power_w") or {}).get("mean"),
        "throttle_share": gpu.get("throttle_share"),
        "joules_per_call": energy / calls if energy is not None else None,
        "busy_share": calls * sustained / wall,
    }
    for key, unit in (("tflop", "tflops"), ("gb", "tbps")):
        if key in work:
            row[f"burst_{unit}"] = work[key] / burst / (1e3 if key == "gb" else 1)
            row[f"sustained_{unit}"] = work[key] / sustained / (1e3 if key == "gb" else 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=6.0, help="each operation's back-to-back run")
    p.add_argument("--m", type=int, default=8192, help="GEMM rows: the scheduler's token budget")
    p.add_argument("--decodes", type=int, default=512, help="decode attention: sequences (steady state ~500)")
    p.add_argument("--context", type=int, default=2112, help="decode attention: keys a sequence")
    p.add_argument("--prefill", default="4x2048", help="prefill attention: PROMPTSxTOKENS")
    p.add_argument(
        "--std",
        type=float,
        nargs="*",
        default=[112.0],
        help="FP8 GEMM operands' spread (v29: 1 and 112 alike)",
    )
    p.add_argument(
        "--accum",
        nargs="*",
        default=["fast", "plain"],
        choices=["fast", "plain"],
        help="FP8 GEMM accumulation: fast (the model's) and / or with float32 promotion",
    )
    p.add_argument(
        "--ops",
        nargs="*",
        default=["gemm", "decode", "prefill"],
        choices=["gemm", "decode", "prefill", "copy", "mixed"],
        help="mixed: one layer of a steady-state mixed step, the GEMMs (fast accumulation) and both attentions "
        "back to back: its sustained time a layer is the power-bound step's, a harness for kernel A/B runs "
        "under the power limit (environment switches apply as in the model)",
    )
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    pb, pt = (int(x) for x in a.prefill.split("x"))
    ops = []
    if "gemm" in a.ops:
        ops += [(f"gemm-8b-layer m{a.m} std{s:g} {acc}-accum", *gemm_layer(a.m, s, acc == "fast"))
                for s in a.std for acc in a.accum]  # fmt: skip
    if "decode" in a.ops:
        ops.append((f"decode-attn-8b b{a.decodes}x{a.context}", *decode_attention(a.decodes, a.context)))
    if "prefill" in a.ops:
        ops.append((f"prefill-attn-8b {a.prefill}", *prefill_attention(pb, pt)))
    if "mixed" in a.ops:
        parts = [
            gemm_layer(a.m, a.std[0], True),
            decode_attention(a.decodes, a.context),
            prefill_attention(pb, pt),
        ]

        def mixed(parts=parts):
            for fn, _ in parts:
                fn()

        ops.append((f"mixed-step-layer m{a.m} b{a.decodes}x{a.context} {a.prefill}", mixed, {}))
    if "copy" in a.ops:  # as many bytes read as the decode attention reads (half of them written back)
        ops.append(("copy", *copy(a.decodes * a.context * HKV * D * 2 / 1e9)))
    rows = []
    for name, fn, work in ops:
        row = measure(name, fn, work, a.seconds)
        rows.append(row)
        rate = " ".join(f"{k} {row[k]:.0f}" for k in ("burst_tflops", "sustained_tflops") if k in row)
        rate += " ".join(f"{k} {row[k]:.2f}" for k in ("burst_tbps", "sustained_tbps") if k in row)
        print(f"{name}: burst {row['burst_ms']:.3f} ms, sustained {row['sustained_ms']:.3f} ms "
              f"(x{row['slowdown']:.3f}); {rate}; SM {row['sm_clock_mhz']} MHz, {row['power_w']} W, "
              f"{row['joules_per_call']} J a call, throttle {row['throttle_share']}")  # fmt: skip
    res = {"device": torch.cuda.get_device_name(), "versions": common.versions(), "git_commit": common.git_commit(),
           "args": vars(a), "rows": rows}  # fmt: skip
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
