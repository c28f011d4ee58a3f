"""Registers, spills and shared memory of the decode-attention kernel (or the prefill kernel, or the FP8 GEMV)
as compiled for a Hopper GPU, and the programs an SM can hold with them; needs Triton's NVIDIA backend, not a GPU (it compiles for sm_90 and reads
the cubin's resource usage with cuobjdump).

    python benchmarks/kernel_resources.py --group 8 --splits 16 --block-n 32 --num-stages 3 --quant-out

The arguments get the specialization a launch gives them (16-byte aligned pointers; the cache, query and
output strides divisible by 16, as the model's tensors have them), so the figures are the launched kernel's
with the Triton installed here (print its version beside them: the device image may have another).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hopperllm.kernels import fp8
from hopperllm.kernels import paged_attention as pa

# Compile options beyond warps and stages (--maxnreg: a register cap, as a launch's maxnreg= sets it)
OPTIONS: dict = {}

# H100 / H200 SM limits
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
THREADS_PER_SM = 2048

_POINTERS = {
    "q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv", "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "out_ptr": "*bf16",
    "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counter_ptr": "*i32", "q8_ptr": "*fp8e4nv",
    "q8_scale_ptr": "*fp32", "k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "positions_ptr": "*i64",
    "cos_sin_ptr": "*fp32", "slot_ptr": "*i64", "ts_ptr": "*i64", "row_groups_ptr": "*i32",
}  # fmt: skip


def decode_attention_resources(group: int, splits: int, block_n: int, num_warps: int, num_stages: int,
                               quant_out: bool, head_dim: int = 128, rotary: bool = False,
                               num_q_heads: int = 32, dot_fp16: bool = True, sass_out: str | None = None,
                               rows: int = 1) -> dict:  # fmt: skip
    """`rows` > 1: the row-group variant (speculative verify steps, HOPPERLLM_VERIFY_ROW_GROUPS)."""
    fn = pa._decode_split_kernel
    consts = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=16, NUM_SPLITS=splits,
        BLOCK_H=max(16, triton.next_power_of_2(group * rows)), ROWS=rows,
        BLOCK_N=block_n, PREFETCH=False, FP8_KV=True, DOT_PRECISION="tf32", DOT_FP16=dot_fp16,
        QUANT_OUT=quant_out, QUANT_BLOCK=triton.next_power_of_2(num_q_heads * head_dim), ROTARY=rotary, KV_LINES=1, USE_PDL=True,
        TIMESTAMPS=False,
    )  # fmt: skip
    return _compile_resources(fn, consts, _POINTERS, num_warps, num_stages, sass_mma=True, sass_out=sass_out)


_PREFILL_POINTERS = {
    "q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv", "out_ptr": "*bf16",
    "cu_seqlens_q_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "k_scale_ptr": "*fp32",
    "v_scale_ptr": "*fp32",
}  # fmt: skip


def prefill_attention_resources(group: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                                fp8_qk: bool = False, head_dim: int = 128, sass_mma: bool = False,
                                pv_fp16: bool = False, fp8_pv: bool = False,
                                sass_out: str | None = None) -> dict:  # fmt: skip
    """The prefill kernel with an FP8 cache and bf16 queries (the model's prefill launch); with `sass_mma`
    also the tensor-core instructions of the cubin and their counts (which operand types the MMAs take)."""
    fn = pa._prefill_kernel
    consts = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=16, BLOCK_M=block_m, BLOCK_Q=block_m // group, BLOCK_N=block_n,
        FP8_KV=True, DOT_PRECISION="tf32", HEAVY_FIRST=True, FP8_QK=fp8_qk, ACT_FP16=pv_fp16, FP8_PV=fp8_pv,
        USE_PDL=False,
    )  # fmt: skip
    return _compile_resources(fn, consts, _PREFILL_POINTERS, num_warps, num_stages, sass_mma, sass_out)


_GEMV_POINTERS = {
    "x_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "out_ptr": "*bf16",
    "partial_ptr": "*fp32", "counter_ptr": "*i32", "amax_ptr": "*fp32", "ts_ptr": "*i64",
}  # fmt: skip


def gemv_resources(block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int,
                   stream_k: bool = False, gated: bool = False, quant_x: bool = False, even_k: bool = True,
                   sass_out: str | None = None) -> dict:  # fmt: skip
    """fp8_gemv's kernel at one config (batch <= 16: BLOCK_M 16; per-token x scales, per-channel weight scales,
    PDL and the L2 prefetch on, as decode launches it), or its stream-K kernel; `sass_out` writes the SASS."""
    consts = dict(
        X_SCALE_PER_ROW=True, W_SCALE_PER_CHANNEL=True, EVEN_K=even_k, BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=block_k, MAX_IMPRECISE_ACC=32, PREFETCH_LINES=fp8.GEMV_PREFETCH_LINES, GATED=gated,
        QUANT_X=quant_x, BLOCK_AMAX=16 if quant_x else 1, USE_PDL=True, TIMESTAMPS=False,
    )  # fmt: skip
    if quant_x:
        consts["X_SCALE_PER_ROW"] = True
    fn = fp8._fp8_gemv_stream_k_kernel if stream_k else fp8._fp8_gemv_kernel
    if stream_k:
        consts["MAX_CONTRIB"] = 4  # the fix-up's unrolled slot loads (a tile in up to 4 pieces)
    else:
        consts["SPLIT_K"] = split_k
    pointers = dict(_GEMV_POINTERS, x_ptr="*bf16") if quant_x else _GEMV_POINTERS
    # the decode matrices' sizes and split lengths are multiples of 16, which a launch specializes on
    divisible = {"N", "K", "K_PER_SPLIT", "SLICE_STRIDE"}
    return _compile_resources(fn, consts, pointers, num_warps, num_stages, True, sass_out, divisible)


def _compile_resources(fn, consts, pointers, num_warps, num_stages, sass_mma=False, sass_out=None,
                       extra_divisible=None) -> dict:  # fmt: skip
    names = fn.arg_names
    # strides the model's tensors give multiples of 16 (stride_bt, the block-table width, is not specialized)
    divisible = {n for n in names if n.startswith("stride_") and n != "stride_bt"} | (
        extra_divisible or set()
    )
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = pointers[n]
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in divisible}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs
    )
    k = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages, **OPTIONS),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        usage = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    if sass_out:
        with open(sass_out, "w") as f:
            f.write(sass)
    regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    smem = k.metadata.shared
    threads = 32 * num_warps
    per_sm = min(REGS_PER_SM // (regs * threads), THREADS_PER_SM // threads, SMEM_PER_SM // max(smem, 1))
    out = {"registers": regs, "spill_stack_bytes": stack, "shared_bytes": smem, "programs_per_sm": per_sm}
    if sass_mma:
        mmas: dict[str, int] = {}
        for m in re.finditer(r"\b(HGMMA|HMMA|QGMMA|IMMA)\.[\w.]+", sass):
            mmas[m.group(0)] = mmas.get(m.group(0), 0) + 1
        out["mma_instructions"] = mmas
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--group", type=int, default=8, help="query heads per kv head")
    p.add_argument(
        "--num-q-heads", type=int, default=32, help="query heads on the rank (sizes the quantized row)"
    )
    p.add_argument("--splits", type=int, default=16)
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--quant-out", action="store_true")
    p.add_argument("--rotary", action="store_true")
    p.add_argument(
        "--rows", type=int, default=1, help="decode: rows a group (the verify steps' row-group variant)"
    )
    p.add_argument(
        "--prefill",
        action="store_true",
        help="the prefill kernel instead (--group, --block-m, --block-n, ...)",
    )
    p.add_argument("--block-m", type=int, default=256)
    p.add_argument(
        "--fp8-qk", action="store_true", help="prefill: QK^T on FP8 operands (HOPPERLLM_PREFILL_FP8_QK)"
    )
    p.add_argument("--no-dot-fp16", action="store_true", help="decode: bfloat16 products (DOT_FP16 off)")
    p.add_argument(
        "--pv-fp16", action="store_true", help="prefill: P @ V in float16 (HOPPERLLM_PREFILL_PV_FP16)"
    )
    p.add_argument(
        "--fp8-pv", action="store_true", help="prefill: P @ V on FP8 operands (HOPPERLLM_PREFILL_FP8_PV)"
    )
    p.add_argument(
        "--gemv", action="store_true", help="fp8_gemv's kernel instead (--block-n, --block-k, ...)"
    )
    p.add_argument("--block-k", type=int, default=256)
    p.add_argument("--split-k", type=int, default=1)
    p.add_argument("--stream-k", action="store_true", help="--gemv: the stream-K kernel")
    p.add_argument("--gated", action="store_true", help="--gemv: gate/up with SiLU-mul in the epilogue")
    p.add_argument("--quant-x", action="store_true", help="--gemv: quantize a bf16 input while loading it")
    p.add_argument("--sass-out", default=None, help="--gemv, --prefill: write the SASS here")
    p.add_argument("--maxnreg", type=int, default=None, help="cap the registers a thread (spills beyond)")
    a = p.parse_args()
    if a.maxnreg:
        OPTIONS["maxnreg"] = a.maxnreg
    if a.gemv:
        r = gemv_resources(a.block_n, a.block_k, a.split_k, a.num_warps, a.num_stages, a.stream_k, a.gated,
                           a.quant_x, sass_out=a.sass_out)  # fmt: skip
        print(f"triton {triton.__version__}, sm_90: fp8 gemv {vars(a)}: {r}")
        return
    if a.prefill:
        r = prefill_attention_resources(a.group, a.block_m, a.block_n, a.num_warps, a.num_stages, a.fp8_qk,
                                        sass_mma=True, pv_fp16=a.pv_fp16, fp8_pv=a.fp8_pv,
                                        sass_out=a.sass_out)  # fmt: skip
        print(f"triton {triton.__version__}, sm_90: prefill attention {vars(a)}: {r}")
        return
    r = decode_attention_resources(a.group, a.splits, a.block_n, a.num_warps, a.num_stages, a.quant_out,
                                   rotary=a.rotary, num_q_heads=a.num_q_heads, dot_fp16=not a.no_dot_fp16,
                                   sass_out=a.sass_out, rows=a.rows)  # fmt: skip
    print(f"triton {triton.__version__}, sm_90: decode attention {vars(a)}: {r}")


if __name__ == "__main__":
    main()
