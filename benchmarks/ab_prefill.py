"""A/B of the paged prefill-attention kernel at the prefill shapes of the benchmarks: launch order (longest
query tiles first or not) and a few launch configs, FP8 cache, against each shape's causal FLOPs.

    python benchmarks/ab_prefill.py --output-json out.json
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
from _report import emit  # benchmarks/ is on sys.path when run as a script
from _setup import prefill_problem

from hopperllm.kernels import paged_attention as pa

SHAPES = [  # (name, sequences, tokens each, Hq, Hkv, D)
    ("llama-2-7b 1x2048", 1, 2048, 32, 32, 128),
    ("llama-3-8b 4x2048", 4, 2048, 32, 8, 128),
    ("llama-2-70b 1x2048", 1, 2048, 64, 8, 128),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--configs",
        nargs="*",
        default=["default", "128-64-8-3", "128-64-4-2", "256-64-8-2", "128-128-8-2"],
        help="BLOCK_M-BLOCK_N-num_warps-num_stages, or 'default' (the kernel's own choice)",
    )
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    rows = []
    for name, B, ctx, hq, hkv, d in SHAPES:
        pb = prefill_problem(B, ctx, hq, hkv, d, shuffle=True)
        flops = pb.flops
        ref = None
        for cfg in a.configs:
            pa.PREFILL_CONFIG = None if cfg == "default" else tuple(int(x) for x in cfg.split("-"))
            for heavy in (False, True):
                pa.PREFILL_HEAVY_FIRST = heavy
                args = (
                    pb.q,
                    pb.cache[0],
                    pb.cache[1],
                    pb.cu,
                    pb.seq_lens,
                    pb.tables,
                    ctx,
                    d**-0.5,
                    pb.one,
                    pb.one,
                )
                fn = functools.partial(pa.paged_prefill_attention, *args)
                try:
                    out = fn()
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                except Exception as e:  # noqa: BLE001 (a config the compiler rejects, e.g. out of shared memory)
                    print(f"{name:20s} {cfg:12s} heavy_first={heavy}: {type(e).__name__}")
                    continue
                same = None if ref is None else bool(torch.equal(out, ref))
                ref = out if ref is None else ref
                row = {"shape": name, "config": cfg, "heavy_first": heavy, "ms": ms,
                       "tflops": flops / (ms * 1e-3) / 1e12, "same_output": same}  # fmt: skip
                rows.append(row)
                print(
                    f"{name:20s} {cfg:12s} heavy_first={heavy!s:5s} {ms:7.3f} ms {row['tflops']:6.1f} TFLOP/s same={same}"
                )
    pa.PREFILL_CONFIG, pa.PREFILL_HEAVY_FIRST = None, True
    emit({"rows": rows}, a.output_json)


if __name__ == "__main__":
    main()
