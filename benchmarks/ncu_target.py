"""One attention kernel at a named shape, launched a few times eagerly: a target for Nsight Compute, which reads
the hardware counters (stall reasons, issue slots, memory throughput) that timing alone cannot give
(device_run.sh ncu-attn: `ncu --launch-skip 5 --launch-count 1 ... python3 benchmarks/ncu_target.py ...`).

    python benchmarks/ncu_target.py --decode "llama2-7b b1"      # the model's decode launch (quantized output)
    python benchmarks/ncu_target.py --prefill "llama3-8b 4x2048"
"""

from __future__ import annotations

import argparse

import torch
from _setup import decode_problem, prefill_problem  # benchmarks/ is on sys.path when run as a script
from tune_attention import PREFILL_SHAPES

from hopperllm.kernels import paged_attention as pa

DECODE_SHAPES = {  # (batch, Hq, Hkv, D, context): batch 1 of the 7B / 8B, the 8B's steady-state mixed step
    "llama2-7b b1": (1, 32, 32, 128, 2048),
    "llama3-8b b1": (1, 32, 8, 128, 2048),
    "llama3-8b b512": (512, 32, 8, 128, 2112),
    "llama2-70b tp2 b1": (1, 32, 4, 128, 2176),
}


def main() -> None:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--decode", choices=sorted(DECODE_SHAPES))
    g.add_argument("--prefill", choices=sorted(PREFILL_SHAPES))
    p.add_argument("--launches", type=int, default=10)
    a = p.parse_args()
    if a.decode:
        B, hq, hkv, d, ctx = DECODE_SHAPES[a.decode]
        dp = decode_problem(B, ctx, hq, hkv, d)
        splits = pa.choose_num_splits(B, hkv, ctx, dp.q.device)
        print(f"decode {a.decode}: {splits} slices, config {pa.decode_config(splits)}")

        def run():
            pa.paged_decode_attention(dp.q, dp.cache[0], dp.cache[1], dp.tables, dp.seq_lens, 0.088, dp.one, dp.one,
                                      num_splits=splits, quant_out=True)  # fmt: skip
    else:
        B, ctx, hq, hkv, d = PREFILL_SHAPES[a.prefill]
        pb = prefill_problem(B, ctx, hq, hkv, d)

        def run():
            pa.paged_prefill_attention(pb.q, pb.cache[0], pb.cache[1], pb.cu, pb.seq_lens, pb.tables, ctx, 0.088,
                                       pb.one, pb.one)  # fmt: skip

    for _ in range(a.launches):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
