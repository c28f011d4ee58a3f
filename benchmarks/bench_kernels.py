"""Times the fused elementwise kernels and the FP8 decode GEMM on the GPU against a measured copy bandwidth.

    python benchmarks/bench_kernels.py --output-json benchmarks/results/kernels.json [--tune]

Every kernel here is memory-bound, so each line reports the bytes it must move (each input read once,
each output written once), the median time (calls captured in a CUDA graph and replayed, through
triton.testing.do_bench_cudagraph), the achieved GB/s and its share of
a large device-to-device copy's bandwidth measured first. Inputs rotate over enough distinct copies that
one measurement's data (the weights, for the GEMMs) are not L2-resident from the previous one.
fp8_gemv runs at M = 1, 4, 16 on the Llama-2-7B decode matrices beside torch._scaled_mm (cuBLASLt).
--tune also sweeps fp8_gemv's block sizes and split-K (about a minute more) and reports the best configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import triton

from hopperllm.kernels import activation, fp8, norm, rotary

FP8 = torch.float8_e4m3fn
LLAMA2_7B_MATRICES = {
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
}
GEMV_MS = (1, 4, 16)
MAX_ROTATION_BYTES = 2 << 30


def median_ms(fn, sets, rep_ms: int = 100) -> float:
    """Median time of one fn(*set) call, the sets taken in turn.

    The calls are captured in a CUDA graph (as decode runs) and replayed, timed with events, by
    triton.testing.do_bench_cudagraph. Plain do_bench would zero a 256 MB buffer before every call to
    flush L2: the dirty lines it leaves are written back while the kernel runs, which costs a
    memory-bound kernel up to its own traffic again. The rotation over sets keeps the data cold instead.
    """
    it = itertools.cycle(sets)
    for _ in range(len(sets)):  # compile and warm up outside the capture
        fn(*next(it))
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(lambda: fn(*next(it)), rep=rep_ms, return_mode="median")


def num_sets(bytes_per_set: int, l2_bytes: int) -> int:
    """Enough distinct input sets that a set is evicted from L2 before it is used again."""
    return max(
        2, min(64, math.ceil(2 * l2_bytes / bytes_per_set), MAX_ROTATION_BYTES // max(bytes_per_set, 1))
    )


def copy_bandwidth_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / ms / 1e6


class Recorder:
    def __init__(self, copy_gbps: float):
        self.copy_gbps = copy_gbps
        self.rows: list[dict] = []

    def add(self, kernel: str, shape: str, ms: float, nbytes: int, **extra) -> dict:
        gbps = nbytes / ms / 1e6
        row = {"kernel": kernel, "shape": shape, "us": ms * 1e3, "bytes": nbytes, "gbps": gbps,
               "pct_copy_bw": 100 * gbps / self.copy_gbps, **extra}  # fmt: skip
        self.rows.append(row)
        tail = "".join(f"  {k}={v:.1f}" if isinstance(v, float) else f"  {k}={v}" for k, v in extra.items())
        print(
            f"{kernel:<22} {shape:<34} {row['us']:9.1f} us {gbps:8.0f} GB/s {row['pct_copy_bw']:5.1f}%{tail}",
            flush=True,
        )
        return row


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def bench_rms_norm(rec: Recorder, l2: int) -> None:
    for T, H in [(16, 4096), (8192, 4096), (8192, 8192)]:
        for out_fp8 in (False, True):
            per_set = 3 * T * H * 2 + T * H * (1 if out_fp8 else 2)
            sets = [(randn(T, H), randn(T, H), randn(H)) for _ in range(num_sets(per_set, l2))]
            ms = median_ms(lambda x, r, w, f=out_fp8: norm.rms_norm(x, w, 1e-5, residual=r, out_fp8=f), sets)
            rec.add("fused_add_rms_norm" + ("_fp8" if out_fp8 else ""), f"T={T} H={H} bf16", ms, per_set)


def bench_rotary(rec: Recorder, l2: int) -> None:
    D, block_size = 128, 16
    cos_sin = rotary.build_cos_sin_cache(D, 8192, 10000.0).cuda()
    for T, hq, hkv in [(16, 32, 8), (8192, 32, 8), (8192, 32, 32)]:
        for kv_dtype in (torch.bfloat16, FP8):
            num_blocks = T // block_size + 1
            kv_elem = 1 if kv_dtype == FP8 else 2
            per_set = (2 * hq + 2 * hkv) * D * T * 2 + 2 * hkv * D * T * kv_elem
            sets = []
            for _ in range(num_sets(per_set, l2)):
                qkv = randn(T, (hq + 2 * hkv) * D)
                q = qkv[:, : hq * D].view(T, hq, D)
                k = qkv[:, hq * D : (hq + hkv) * D].view(T, hkv, D)
                v = qkv[:, (hq + hkv) * D :].view(T, hkv, D)
                cache = torch.zeros(2, num_blocks, block_size, hkv, D, device="cuda").to(kv_dtype)
                sets.append((q, k, v, cache))
            positions = torch.randint(0, 8192, (T,), device="cuda")
            slots = torch.randperm(num_blocks * block_size, device="cuda")[:T]
            scale = torch.ones(1, device="cuda")

            def run(q, k, v, cache, positions=positions, slots=slots, scale=scale):
                rotary.rotary_kv_write(q, k, v, positions, cos_sin, cache, slots, scale, scale)

            ms = median_ms(run, sets)
            name = "rotary_kv_write" + ("_fp8" if kv_dtype == FP8 else "")
            rec.add(name, f"T={T} Hq={hq} Hkv={hkv} D={D}", ms, per_set)


def bench_silu_and_mul(rec: Recorder, l2: int) -> None:
    for T, inter in [(16, 11008), (8192, 11008)]:
        for out_fp8 in (False, True):
            per_set = T * 2 * inter * 2 + T * inter * (1 if out_fp8 else 2)
            sets = [(randn(T, 2 * inter),) for _ in range(num_sets(per_set, l2))]
            ms = median_ms(lambda x, f=out_fp8: activation.silu_and_mul(x, out_fp8=f), sets)
            rec.add("silu_and_mul" + ("_fp8" if out_fp8 else ""), f"T={T} I={inter} bf16", ms, per_set)


def bench_silu_fp8_variants(rec: Recorder, l2: int) -> None:
    """The fused SwiGLU + per-token FP8 kernel's launch shapes against the unfused pair of kernels."""
    variants = [
        {"BLOCK": 16384, "SINGLE_PASS": True, "num_warps": 16},
        {"BLOCK": 16384, "SINGLE_PASS": True, "num_warps": 8},
        {"BLOCK": 4096, "SINGLE_PASS": False, "num_warps": 8},
        {"BLOCK": 2048, "SINGLE_PASS": False, "num_warps": 4},
        {"BLOCK": 1024, "SINGLE_PASS": False, "num_warps": 4},
    ]
    for T, inter in [(16, 11008), (256, 11008), (8192, 11008)]:
        per_set = T * 2 * inter * 2 + T * inter
        sets = [(randn(T, 2 * inter),) for _ in range(num_sets(per_set, l2))]
        out = torch.empty(T, inter, dtype=FP8, device="cuda")
        scale = torch.empty(T, 1, device="cuda")
        for v in variants:

            def fused(x, v=v, out=out, scale=scale, grid=(T,), inter=inter):
                activation._silu_and_mul_fp8_kernel[grid](
                    x, out, scale, inter, x.stride(0), out.stride(0), **v
                )

            rec.add("silu_fp8_fused", f"T={T} I={inter} {v}", median_ms(fused, sets), per_set)
        unfused = median_ms(lambda x: fp8.per_token_quant_fp8(activation.silu_and_mul(x)), sets)
        rec.add("silu_fp8_unfused", f"T={T} I={inter}", unfused, per_set)
        # the same launch shapes for plain per-token quantization of an 11008-wide row
        per_set = T * inter * 3
        sets = [(randn(T, inter),) for _ in range(num_sets(per_set, l2))]
        for v in variants:

            def quant(x, v=v, out=out, scale=scale, grid=(T,), inter=inter):
                fp8._per_token_quant_kernel[grid](x, out, scale, inter, x.stride(0), out.stride(0), **v)

            rec.add("per_token_quant_variant", f"T={T} K={inter} {v}", median_ms(quant, sets), per_set)


def bench_quant(rec: Recorder, l2: int) -> None:
    for T, K in [(16, 4096), (8192, 4096)]:
        per_set = T * K * 3
        sets = [(randn(T, K),) for _ in range(num_sets(per_set, l2))]
        rec.add("per_token_quant_fp8", f"T={T} K={K} bf16", median_ms(fp8.per_token_quant_fp8, sets), per_set)


def gemv_sets(M: int, N: int, K: int, l2: int):
    per_set = N * K + M * K + 2 * M * N
    sets = []
    for _ in range(num_sets(per_set, l2)):
        w = randn(N, K, dtype=torch.float32, scale=0.02)
        w_scale = w.abs().amax(dim=1) / 448.0
        x_fp8, x_scale = fp8.ref_per_token_quant_fp8(randn(M, K))
        sets.append((x_fp8, x_scale, (w / w_scale[:, None]).to(FP8), w_scale))
        del w
    return sets, per_set


def bench_fp8_gemv(rec: Recorder, l2: int) -> None:
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (N, K) in LLAMA2_7B_MATRICES.items():
        for M in GEMV_MS:
            sets, nbytes = gemv_sets(M, N, K, l2)
            ms = median_ms(lambda x, xs, w, ws: fp8.fp8_gemv(x, xs, w, ws), sets)
            try:
                mm_ms = median_ms(lambda x, xs, w, ws: fp8.scaled_mm(x, xs, w, ws), sets)
            except RuntimeError as e:  # some cuBLASLt builds reject tiny M
                print(f"torch._scaled_mm failed at M={M} N={N} K={K}: {e}")
                mm_ms = float("nan")
            cfg = fp8.fp8_gemv_config(M, N, K, num_sms)
            rec.add("fp8_gemv", f"{name} M={M} N={N} K={K}", ms, nbytes,
                    scaled_mm_us=mm_ms * 1e3, speedup_vs_scaled_mm=mm_ms / ms,
                    config=f"BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} SK{cfg['SPLIT_K']}")  # fmt: skip
            del sets


def tune_fp8_gemv(rec: Recorder, l2: int) -> list[dict]:
    """Sweep fp8_gemv's block sizes / split-K per shape; returns the best config per (matrix, M)."""
    best_rows = []
    space = [
        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_stages": st, "num_warps": 4}
        for bn, bk, sk, st in itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4), (3, 5))
        if bn * bk <= 32768
    ]
    for name, (N, K) in LLAMA2_7B_MATRICES.items():
        for M in (1, 16):  # BLOCK_M is 16 for both: M barely changes the kernel's cost
            sets, nbytes = gemv_sets(M, N, K, l2)
            results = []
            for cfg in space:
                try:
                    ms = median_ms(lambda x, xs, w, ws, c=cfg: fp8.fp8_gemv(x, xs, w, ws, config=c), sets, 20)
                except Exception as e:  # out of shared memory and the like
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                results.append((ms, cfg))
            if not results:
                continue
            results.sort(key=lambda r: r[0])
            ms, cfg = results[0]
            print(f"  top-3 {name} M={M}: " + "; ".join(f"{m * 1e3:.1f}us {c}" for m, c in results[:3]))
            for acc in (128, None):  # the price of promoting the fp8 MMA partial sums every k-step
                c = {**cfg, "MAX_IMPRECISE_ACC": acc}
                acc_ms = median_ms(lambda x, xs, w, ws, c=c: fp8.fp8_gemv(x, xs, w, ws, config=c), sets, 20)
                print(f"    MAX_IMPRECISE_ACC={acc}: {acc_ms * 1e3:.1f} us")
            best_rows.append(
                rec.add("fp8_gemv_tuned", f"{name} M={M} N={N} K={K}", ms, nbytes, config=str(cfg))
            )
            del sets
    return best_rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-json", default=None, help="write all rows and the device info here")
    parser.add_argument("--tune", action="store_true", help="also sweep fp8_gemv configs")
    parser.add_argument("--only", default=None, help="comma list of: norm,rotary,silu,silu_fp8,quant,gemv")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")

    start = time.time()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    copy_gbps = copy_bandwidth_gbps()
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 1e6:.0f} MB, "
          f"device-to-device copy {copy_gbps:.0f} GB/s (read + write)")  # fmt: skip
    rec = Recorder(copy_gbps)
    benches = {"norm": bench_rms_norm, "rotary": bench_rotary, "silu": bench_silu_and_mul,
               "silu_fp8": bench_silu_fp8_variants, "quant": bench_quant, "gemv": bench_fp8_gemv}  # fmt: skip
    for key in args.only.split(",") if args.only else benches:
        benches[key](rec, l2)
        torch.cuda.empty_cache()
    if args.tune:
        tune_fp8_gemv(rec, l2)
    print(f"done in {time.time() - start:.0f} s")
    if args.output_json:
        info = {"device": props.name, "num_sms": props.multi_processor_count, "l2_bytes": l2,
                "copy_gbps": copy_gbps, "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
        with open(args.output_json, "w") as f:
            json.dump({"info": info, "rows": rec.rows}, f, indent=1)


if __name__ == "__main__":
    main()
