"""torch._scaled_mm (FP8, row-wise scales) time vs M at a model's prefill GEMM shapes: are odd token counts
slow, and how close to the FP8 tensor-core rate do the prefill GEMMs run?

    python benchmarks/bench_scaled_mm_m.py [--model 8b|70b-tp2|70b-tp4|70b-tp8] [--m 8192 4096 ...]
"""

import argparse

import torch

SHAPES = {  # (N, K) per projection, one rank's shard under tensor parallelism
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "70b-tp2": {"qkv": (5120, 8192), "o": (8192, 4096), "gate_up": (28672, 8192), "down": (8192, 14336)},
    "70b-tp4": {"qkv": (2560, 8192), "o": (8192, 2048), "gate_up": (14336, 8192), "down": (8192, 7168)},
    "70b-tp8": {"qkv": (1280, 8192), "o": (8192, 1024), "gate_up": (7168, 8192), "down": (8192, 3584)},
}

p = argparse.ArgumentParser()
p.add_argument("--model", default="8b", choices=sorted(SHAPES))
p.add_argument("--m", type=int, nargs="+", default=[8192, 8021, 8020, 8000, 7936, 4096, 4000, 256, 197])
a = p.parse_args()
for M in a.m:
    tot = flops = 0.0
    row = []
    for name, (N, K) in SHAPES[a.model].items():
        x = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
        w = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
        sx = torch.rand(M, 1, device="cuda") + 0.5
        sw = torch.rand(1, N, device="cuda") + 0.5
        f = lambda x=x, w=w, sx=sx, sw=sw: torch._scaled_mm(
            x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16
        )  # noqa: E731
        for _ in range(3):
            f()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            f()
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / 10
        tot += ms
        flops += 2 * M * N * K
        row.append(f"{name} {ms:.3f} ms ({2 * M * N * K / ms / 1e9:.0f} TF/s)")
    print(f"{a.model} M={M:5d} layer {tot:.3f} ms ({flops / tot / 1e9:.0f} TF/s) | " + " | ".join(row))
