"""Sweep fp8_gemv launch configs at batch 1 for the Llama-2-7B, Llama-3-8B and Llama-2-70B decode matrices.

gate_up and down are timed as decode launches them (gate/up with SiLU-mul in its epilogue, down quantizing its
bf16 input as it loads it; --unfused for plain fp8_gemv). Times each config in a CUDA graph with cold weights (benchmarks/bench_kernels.median_ms), against the
measured read-only and copy bandwidths, and prints the best configs per matrix next to the default.

    python benchmarks/tune_gemv.py --output-json tune-gemv.json [--models 7b,70b]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import copy_bandwidth_gbps, gemv_sets, median_ms  # noqa: E402

from hopperllm.kernels import fp8  # noqa: E402

MATRICES = {
    "7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    # one rank's shard with tensor parallelism: column-parallel N / tp, row-parallel K / tp
    "70b-tp2": {"gate_up": (28672, 8192), "down": (8192, 14336), "qkv": (5120, 8192), "o": (8192, 4096)},
    "70b-tp4": {"gate_up": (14336, 8192), "down": (8192, 7168), "qkv": (2560, 8192), "o": (8192, 2048)},
    "70b-tp8": {"gate_up": (7168, 8192), "down": (8192, 3584), "qkv": (1280, 8192), "o": (8192, 1024)},
}


def read_bandwidth_gbps() -> float:
    """Read-only stream (a sum over 2 GiB): what a GEMV's weight stream can at best reach."""
    x = torch.ones(1 << 29, dtype=torch.float32, device="cuda")
    ms = triton.testing.do_bench(lambda: x.sum(), warmup=25, rep=200, return_mode="median")
    return x.numel() * 4 / ms / 1e6


def deferred_input(x_fp8: torch.Tensor, x_scale: torch.Tensor) -> fp8.DeferredQuant:
    values = (x_fp8.float() * x_scale).to(torch.bfloat16)
    return fp8.DeferredQuant(values, values.float().abs().amax(dim=1, keepdim=True))


def deferred_launch(x, _unused, w, ws, config=None):
    return fp8.fp8_gemv_deferred(x, w, ws, config=config)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="7b,70b")
    p.add_argument(
        "--split-k",
        default=None,
        help="comma-separated SPLIT_K values to sweep for every tile config (default: derived per tile, "
        "~1.5 waves); with it the space keeps BLOCK_K 256 and 4 stages",
    )
    p.add_argument(
        "--unfused",
        action="store_true",
        help="time gate_up and down as plain fp8_gemv (default: as decode launches them, the gate/up GEMV "
        "with SiLU-mul in its epilogue and the down GEMV quantizing its input)",
    )
    p.add_argument(
        "--stream-k",
        action="store_true",
        help="sweep stream-K launches instead (fp8_gemv config STREAM_K: 1 or 2 programs an SM, BLOCK_K 256)",
    )
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbps, read_gbps = copy_bandwidth_gbps(), read_bandwidth_gbps()
    print(f"copy {copy_gbps:.0f} GB/s, read {read_gbps:.0f} GB/s, L2 {l2 >> 20} MiB, {sms} SMs")
    res = {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "read_gbps": read_gbps, "rows": []}
    if a.stream_k:
        space = [
            {"BLOCK_N": bn, "BLOCK_K": 256, "num_stages": st, "num_warps": nw, "STREAM_K": per_sm * sms}
            for bn, st, nw, per_sm in itertools.product((64, 128), (3, 4), (4, 8), (1, 2))
        ]
    elif a.split_k:
        space = [
            {"BLOCK_N": bn, "BLOCK_K": 256, "num_stages": 4, "num_warps": nw, "SPLIT_K": int(sk)}
            for bn, nw, sk in itertools.product((32, 64, 128), (4, 8), a.split_k.split(","))
            if not (bn == 32 and nw == 8)
        ]
    else:
        space = [
            {"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": st, "num_warps": nw}
            for bn, bk, st, nw in itertools.product((32, 64, 128), (256, 512), (4, 6), (4, 8))
            if bn * bk <= 65536 and not (bn == 32 and nw == 8)
        ]
    for model in a.models.split(","):
        for name, (N, K) in MATRICES[model].items():
            sets, nbytes = gemv_sets(1, N, K, l2)
            default = fp8.fp8_gemv_config(1, N, K, sms)
            launch = fp8.fp8_gemv
            if name == "gate_up" and not a.unfused:
                launch = fp8.fp8_gemv_silu_mul
            elif name == "down" and not a.unfused:  # its input as the gated GEMV leaves it: bf16 + amax
                sets = [(deferred_input(x, xs), None, w, ws) for x, xs, w, ws in sets]
                launch = deferred_launch
            results = []
            for cfg in [{}] + space:
                full = {**default, **cfg}
                if cfg and "SPLIT_K" not in cfg and "STREAM_K" not in cfg and "BLOCK_N" in cfg:
                    # derive split-K for the block size: ~1.5 waves, >= 4 K chunks per slice
                    tiles = triton.cdiv(N, full["BLOCK_N"])
                    chunks = triton.cdiv(K, full["BLOCK_K"])
                    sk = 1
                    while tiles * sk < 1.5 * sms and chunks >= 8 * sk:
                        sk *= 2
                    full["SPLIT_K"] = sk
                try:
                    ms = median_ms(lambda x, xs, w, ws, c=full, f=launch: f(x, xs, w, ws, config=c), sets, 30)
                except Exception as e:  # out of shared memory and the like
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                results.append((ms, "default" if not cfg else "", full))
            results.sort(key=lambda r: r[0])
            dflt = next(r for r in results if r[1] == "default")
            for ms, tag, cfg in results[:3] + [dflt]:
                gbps = nbytes / ms / 1e6
                row = {"model": model, "matrix": name, "N": N, "K": K, "us": ms * 1e3, "gbps": gbps,
                       "pct_read": 100 * gbps / read_gbps, "default": tag == "default", "config": cfg}  # fmt: skip
                res["rows"].append(row)
                print(f"{model:4s} {name:8s} {ms * 1e3:8.1f} us {gbps:6.0f} GB/s {row['pct_read']:5.1f}% of read"
                      f" {'DEFAULT ' if tag else ''}{ {k: cfg.get(k, 0) for k in ('BLOCK_N', 'BLOCK_K', 'SPLIT_K', 'STREAM_K', 'num_stages', 'num_warps')} }")  # fmt: skip
            del sets
            torch.cuda.empty_cache()
            if a.output_json:  # after every matrix: a run cut short keeps what it measured
                with open(a.output_json, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
