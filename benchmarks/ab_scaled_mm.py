"""A/B of torch._scaled_mm's fast FP8 accumulation (use_fast_accum) at the prefill / throughput GEMM shapes,
with row-wise scales as the FP8 linear layer passes them: time, TFLOP/s, and the error of each against a
float64 product of the same FP8 operands.

    python benchmarks/ab_scaled_mm.py --output-json out.json
"""

from __future__ import annotations

import argparse

import torch
import triton
from _report import emit  # benchmarks/ is on sys.path when run as a script

SHAPES = {  # model: (M, {name: (N, K)})
    "llama-3-8b": (
        8192,
        {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    ),
    "llama-2-7b": (
        2048,
        {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    ),
    "llama-2-70b": (
        2048,
        {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
    ),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for model, (M, mats) in SHAPES.items():
        total = {False: 0.0, True: 0.0}
        for name, (N, K) in mats.items():
            x = (torch.randn(M, K, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
            w = (torch.randn(N, K, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
            sa = torch.rand(M, 1, device="cuda", generator=g) + 0.5
            sb = torch.rand(1, N, device="cuda", generator=g) + 0.5
            rows_ref = slice(
                0, 256
            )  # error measured on the first 256 rows (a float64 product of all is slow)
            ref = (x[rows_ref].double() * sa[rows_ref].double()) @ (w.double() * sb.double().T).T
            for fast in (False, True):

                def f(fast=fast, x=x, w=w, sa=sa, sb=sb):
                    return torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)  # fmt: skip

                ms = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
                y = f()[rows_ref].double()
                err = ((y - ref).norm() / ref.norm()).item()
                total[fast] += ms
                rows.append({"model": model, "matrix": name, "M": M, "N": N, "K": K, "fast_accum": fast, "ms": ms,
                             "tflops": 2 * M * N * K / (ms * 1e-3) / 1e12, "rel_err": err})  # fmt: skip
                print(f"{model:12s} {name:8s} M={M} fast={fast!s:5s} {ms:7.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s "
                      f"rel err {err:.2e}")  # fmt: skip
        print(f"{model:12s} layer: {total[False]:.3f} ms -> fast accumulation {total[True]:.3f} ms")
        rows.append({"model": model, "layer_ms": total[False], "layer_ms_fast_accum": total[True]})
    emit({"rows": rows}, a.output_json)


if __name__ == "__main__":
    main()
