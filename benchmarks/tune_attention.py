"""Sweep the paged decode-attention launch parameters at the decode shapes that matter and print the
time against the floor (K/V bytes over the measured copy bandwidth).

    python benchmarks/tune_attention.py --output-json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
from _setup import decode_problem, prefill_problem  # benchmarks/ is on sys.path when run as a script
from bench_kernels import median_ms

from hopperllm.bench.gpu_monitor import GpuMonitor
from hopperllm.kernels import paged_attention as pa


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prefill", action="store_true", help="also sweep the prefill kernel (4 x 2048 tokens)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--shapes", nargs="*", default=None, help="decode shape names to sweep (default: all)")
    p.add_argument("--splits", type=int, nargs="*", default=None, help="decode split counts to sweep")
    p.add_argument(
        "--block-n", type=int, nargs="*", default=[16, 32, 64, 128], help="decode key tiles to sweep"
    )
    p.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=None,
        help="decode contexts to sweep (default: each shape's)",
    )
    p.add_argument("--quant-out", action="store_true", help="decode: quantize the output as the model does")
    p.add_argument(
        "--cache-blocks", type=int, default=0,
        help="decode: a cache of at least this many blocks, the tables scattered over all of it (the throughput "
        "run's 8B holds 118,730: 3.9 GB a layer; by default the cache holds just the batch's blocks)",
    )  # fmt: skip
    p.add_argument(
        "--num-stages", type=int, nargs="*", default=[2, 3], help="decode pipeline stages to sweep"
    )
    p.add_argument("--num-warps", type=int, nargs="*", default=[4], help="decode warps per program to sweep")
    p.add_argument(
        "--maxnreg", type=int, nargs="*", default=[-1],
        help="decode register caps a thread to sweep, every variant at the value (0: none, the compiler's "
        "choice; -1, the default: each config's own caps, paged_attention.decode_maxnreg)",
    )  # fmt: skip
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="decode key loops to sweep as PREFETCH,num_stages[,DOT_FP16] (e.g. 0,3 1,1 0,3,1); replaces --num-stages",
    )
    p.add_argument(
        "--prefill-shapes", nargs="*", default=list(PREFILL_SHAPES), help="prefill shape names to sweep"
    )
    p.add_argument(
        "--prefill-configs", nargs="*", default=None,
        help="prefill tiles to sweep as BLOCK_M,BLOCK_N,num_warps,num_stages (default: 16 of them)",
    )  # fmt: skip
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    # the SM clock the kernels ran at (against the throughput run's, in its JSON)
    monitor = GpuMonitor().start()
    bw = copy_bandwidth()
    rows = []
    shapes = [  # (name, batch, Hq, Hkv, D, context)
        ("llama2-7b b1", 1, 32, 32, 128, 2048),
        ("llama3-8b b1", 1, 32, 8, 128, 2048),
        ("llama2-7b b32", 32, 32, 32, 128, 2048),
        ("llama3-8b b32", 32, 32, 8, 128, 2176),
        ("llama3-8b b64", 64, 32, 8, 128, 2176),
        # the throughput run's decodes (~150-250 a step at 2048-2176 keys; perf-notes v25)
        ("llama3-8b b128", 128, 32, 8, 128, 2176),
        ("llama3-8b b256", 256, 32, 8, 128, 2176),
        # v27's steady-state mixed steps: ~500 decodes of 2049-2176 keys (864 us a layer in the throughput run)
        ("llama3-8b b512", 512, 32, 8, 128, 2112),
        ("llama2-70b b1", 1, 64, 8, 128, 2176),
        ("llama2-70b tp2 b1", 1, 32, 4, 128, 2176),  # one rank's heads at tensor_parallel_size 2
        ("llama2-70b tp4 b1", 1, 16, 2, 128, 2176),
        ("llama2-70b tp8 b1", 1, 8, 1, 128, 2176),
        ("llama2-70b tp8 b16", 16, 8, 1, 128, 2176),
        # batches 5-8 of the TP=2 budget run replay the graph captured for 8 sequences
        ("llama2-70b tp2 b8", 8, 32, 4, 128, 2176),
    ]
    default_configs = [dict(c) for c in pa.DECODE_CONFIGS]
    shapes = [s for s in shapes if a.shapes is None or s[0] in a.shapes]
    if a.contexts:  # the same heads and batch at other context lengths (time against keys per program)
        shapes = [(f"{n} ctx{c}", B, hq, hkv, d, c) for n, B, hq, hkv, d, _ in shapes for c in a.contexts]
    for name, B, hq, hkv, d, ctx in shapes if a.decode else []:
        # enough caches that repeated calls do not read L2-resident data (a layer's cache is cold in a step)
        dp = decode_problem(
            B, ctx, hq, hkv, d, a.cache_blocks, torch.cuda.get_device_properties(0).L2_cache_size
        )
        floor_us = dp.kv_bytes / bw * 1e6
        best = None
        split_choices = a.splits or ([4, 8, 16, 32, 64] if B * hkv <= 32 else [1, 2])
        variants = [tuple(int(x) for x in v.split(",")) for v in a.variants] if a.variants else None
        variants = variants or [(0, ns) for ns in a.num_stages]
        for splits, bn, nw, (prefetch, ns, *fp16), maxnreg in itertools.product(
            split_choices, a.block_n, a.num_warps, variants, a.maxnreg
        ):
            if splits > 1 and ctx // splits < bn and not a.contexts:
                continue
            for cfg, default in zip(pa.DECODE_CONFIGS, default_configs, strict=True):
                cfg.update({"BLOCK_N": bn, "num_warps": nw, "num_stages": ns, "PREFETCH": bool(prefetch),
                            "DOT_FP16": bool(fp16[0]) if fp16 else default.get("DOT_FP16", False),
                            **(pa.decode_maxnreg_from_env(str(maxnreg)) if maxnreg >= 0 else
                               {k: default.get(k) for k in ("maxnreg", "maxnreg_quant")})})  # fmt: skip
            dot_fp16 = pa.decode_dot_fp16(pa.decode_config(splits))

            def run(c, dp=dp, splits=splits):
                pa.paged_decode_attention(
                    dp.q,
                    c[0],
                    c[1],
                    dp.tables,
                    dp.seq_lens,
                    0.088,
                    dp.one,
                    dp.one,
                    num_splits=splits,
                    quant_out=a.quant_out,
                )

            try:
                # in a CUDA graph, as decode runs (a batch-1 launch is ~10 us, far below the host's launch
                # time, which plain do_bench would measure instead)
                us = median_ms(run, [(c,) for c in dp.caches], rep_ms=50) * 1e3
            except Exception as e:  # noqa: BLE001 (a config the compiler rejects)
                print("skip", splits, bn, nw, ns, type(e).__name__)
                continue
            row = {
                "shape": name,
                "context": ctx,
                "quant_out": a.quant_out,
                "splits": splits,
                "BLOCK_N": bn,
                "num_warps": nw,
                "num_stages": ns,
                "prefetch": bool(prefetch),
                "dot_fp16": dot_fp16,
                "maxnreg": pa.decode_maxnreg(
                    pa.decode_config(splits),
                    a.quant_out,
                    B * hkv * splits,
                    torch.cuda.get_device_properties(0).multi_processor_count,
                ),
                "us": us,
                "floor_us": floor_us,
                "pct_of_floor": 100 * floor_us / us,
                "cache_blocks": dp.blocks,
            }
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        print(f"{name}: floor {floor_us:.1f} us; best {best}")
    if a.prefill:
        for name in a.prefill_shapes:
            configs = [tuple(int(x) for x in c.split(",")) for c in a.prefill_configs or []]
            rows += tune_prefill(name, *PREFILL_SHAPES[name], configs=configs or None)
    monitor.stop()
    res = {"copy_bandwidth_GBps": bw / 1e9, "rows": rows, "gpu_monitor": monitor.summary()}
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)


# prefill steps that matter, (B, prompt length, Hq, Hkv, D), FP8 cache: the throughput benchmark's step
# (Llama-3-8B), and the first step of the 70B TP=2 budget run's batch 6 (one rank's heads, 4 of its prompts)
PREFILL_SHAPES = {
    "llama3-8b 4x2048": (4, 2048, 32, 8, 128),
    "llama2-70b tp2 4x2048": (4, 2048, 32, 4, 128),
    "llama2-7b 1x2048": (1, 2048, 32, 32, 128),  # the batch-1 latency run's prompt (MHA)
}


def tune_prefill(
    name: str, B: int, ctx: int, hq: int, hkv: int, d: int, configs: list[tuple[int, ...]] | None = None
) -> list[dict]:
    """Sweep the prefill kernel's tiles (`configs`, default 16) on one prefill step of B prompts of ctx tokens."""
    saved = pa.PREFILL_CONFIG  # (HOPPERLLM_PREFILL_CONFIG's, restored after the sweep)
    rows = []
    pb = prefill_problem(B, ctx, hq, hkv, d)
    flops = pb.flops
    best = None
    for bm, bn, nw, ns in configs or itertools.product([128, 256], [64, 128], [4, 8], [2, 3]):
        pa.PREFILL_CONFIG = (bm, bn, nw, ns)
        try:
            ms = triton.testing.do_bench(
                lambda: pa.paged_prefill_attention(
                    pb.q, pb.cache[0], pb.cache[1], pb.cu, pb.seq_lens, pb.tables, ctx, 0.088, pb.one, pb.one
                ),
                warmup=10,
                rep=40,
                return_mode="median",
            )
        except Exception as e:  # noqa: BLE001 (a config the compiler rejects, e.g. out of shared memory)
            print("skip prefill", bm, bn, nw, ns, type(e).__name__)
            continue
        row = {
            "shape": f"prefill {name}",
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "num_warps": nw,
            "num_stages": ns,
            "fp8_qk": pa.PREFILL_FP8_QK,
            "fp8_pv": pa.PREFILL_FP8_PV,
            "pv_fp16": pa.PREFILL_PV_FP16,
            "us": ms * 1e3,
            "tflops": flops / (ms * 1e-3) / 1e12,
        }
        rows.append(row)
        if best is None or row["us"] < best["us"]:
            best = row
    pa.PREFILL_CONFIG = saved
    print(f"prefill {name}: best {best}")
    return rows


if __name__ == "__main__":
    main()
