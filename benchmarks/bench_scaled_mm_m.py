"""torch._scaled_mm (FP8, row-wise scales) time vs M at Llama-3-8B shapes: are odd token counts slow?"""

import torch

shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
for M in (8192, 8021, 8020, 8000, 7936, 4096, 4000, 256, 197):
    tot = 0.0
    row = []
    for name, (N, K) in shapes.items():
        a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
        sa = torch.rand(M, 1, device="cuda") + 0.5
        sb = torch.rand(1, N, device="cuda") + 0.5
        f = lambda a=a, b=b, sa=sa, sb=sb: torch._scaled_mm(
            a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16
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
        row.append(f"{name} {ms:.3f} ms ({2 * M * N * K / ms / 1e9:.0f} TF/s)")
    print(f"M={M:5d} layer {tot:.3f} ms | " + " | ".join(row))
