"""Where a tensor-parallel decode step goes: the engine's step time at batch `--batch-size` after a
`--context`-token prompt, and on every rank the decode graph's replay time, the same forward without its
all-reduces, the step's all-reduces alone (our implementation and plain NCCL) and one profiled eager
forward (hopperllm/worker/profiling.py).

    python benchmarks/profile_tp.py --model dummy:llama-2-70b -tp 2 --output-json profile-tp2.json
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script
from _setup import add_decode_args, decode_llm, start_decodes

from hopperllm.worker.profiling import decode_step_profile


def main():
    p = argparse.ArgumentParser()
    add_decode_args(p, model="dummy:llama-2-70b", gpu_memory_utilization=0.9)
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=2)
    a = p.parse_args()
    llm = decode_llm(a, a.batch_size, a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size)
    eng = llm.engine
    start_decodes(eng, a.batch_size, a.context, settle_steps=5)
    n = 100
    t0 = time.perf_counter()
    for _ in range(n):
        eng.step()
    res: dict = {
        "model": a.model,
        "tensor_parallel_size": a.tensor_parallel_size,
        "device": torch.cuda.get_device_name(0),
        "batch_size": a.batch_size,
        "context": a.context,
        "engine_step_ms": (time.perf_counter() - t0) / n * 1e3,
    }
    ranks = eng.executor.collective_rpc(decode_step_profile, a.batch_size, reply_all=True)
    r0 = ranks[0]
    res["summary"] = {
        k: r0.get(k)
        for k in (
            "graph_step_ms",
            "graph_step_no_allreduce_ms",
            "allreduce_in_step_ms",
            "allreduce_share_in_step",
            "collectives",
            "allreduce_impl",
            "allreduce_alone_ms",
            "allreduce_alone_us_each",
            "allreduce_alone_nccl_ms",
            "allreduce_alone_nccl_us_each",
            "fused_ar_norm_alone_us_each",
            "norm_alone_us_each",
        )
    }
    res["summary"]["allreduce_share_of_engine_step"] = r0["allreduce_in_step_ms"] / res["engine_step_ms"]
    res["ranks"] = ranks
    eng.shutdown()
    emit(res, a.output_json)


if __name__ == "__main__":
    main()
