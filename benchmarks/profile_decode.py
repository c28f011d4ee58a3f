"""Where does a batch-1 decode step go? GPU time of the captured graph vs the whole engine step,
the host phases of a step, and the top kernels of one eager forward.

    python benchmarks/profile_decode.py --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8
    python benchmarks/profile_decode.py --window-steps 20   # + the GPU's idle time between steady-state steps
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script
from _setup import add_decode_args, decode_llm, start_decodes

from hopperllm.worker.profiling import kernel_times, timed_replays


def main():
    p = argparse.ArgumentParser()
    add_decode_args(p)
    p.add_argument("--gemv-m1-like-m4", action="store_true", help="use the M>1 fp8_gemv table at M=1")
    p.add_argument("--prefill", action="store_true", help="also profile one 8192-token prefill step")
    p.add_argument(
        "--window-steps", type=int, default=0,
        help="also torch-profile this many consecutive decode steps as the engine runs them (no synchronizing): "
        "how much of the window the GPU was busy, its largest idle gaps and what ran outside the graph",
    )  # fmt: skip
    a = p.parse_args()
    if a.gemv_m1_like_m4:
        from hopperllm.kernels import fp8

        orig = fp8.fp8_gemv_config
        fp8.fp8_gemv_config = lambda M, N, K, n: orig(max(M, 2), N, K, n) | {"BLOCK_M": 16}
    llm = decode_llm(a, a.batch_size, a.gpu_memory_utilization)
    eng = llm.engine
    runner = eng.executor.runner
    res: dict = {
        "model": a.model,
        "batch_size": a.batch_size,
        "context": a.context,
        "gemv_m1_like_m4": a.gemv_m1_like_m4,
    }
    start_decodes(eng, a.batch_size, a.context)
    # 1) host phases of steady-state decode steps
    phases = defaultdict(float)
    orig_exec = runner.execute_model
    orig_prep = runner._prepare
    orig_sched = eng.scheduler.schedule

    def timed(name, fn):
        def w(*args, **kw):
            torch.cuda.synchronize() if name == "execute_model" else None
            t = time.perf_counter()
            r = fn(*args, **kw)
            phases[name] += time.perf_counter() - t
            return r

        return w

    runner.execute_model = timed("execute_model", orig_exec)
    runner._prepare = timed("prepare", orig_prep)
    eng.scheduler.schedule = timed("schedule", orig_sched)
    n = 50
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        eng.step()
    step_ms = (time.perf_counter() - t0) / n * 1e3
    res["engine_step_ms"] = step_ms
    res["host_phases_ms"] = {k: v / n * 1e3 for k, v in phases.items()}
    runner.execute_model, runner._prepare, eng.scheduler.schedule = orig_exec, orig_prep, orig_sched
    if a.window_steps:
        from profile_throughput import gpu_idle_window

        for _ in range(5):
            eng.step()
        res["window"] = gpu_idle_window(eng, a.window_steps)
    # 2) pure GPU time of the captured graph at this batch size
    gr = runner.graph_runner
    if gr is not None:
        bs = next(s for s in gr.sizes if s >= a.batch_size)
        gr.seq_lens[: a.batch_size].fill_(a.context)
        res["graph_replay_ms"] = timed_replays(gr.graphs[bs])
    # 3) kernels of one eager decode forward
    from torch.profiler import ProfilerActivity, profile

    meta = gr._meta(bs)
    with torch.inference_mode():
        for _ in range(3):
            runner.model(gr.input_ids[:bs], gr.positions[:bs], runner.kv_caches, meta)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.model(gr.input_ids[:bs], gr.positions[:bs], runner.kv_caches, meta)
            torch.cuda.synchronize()
    agg = kernel_times(prof)
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:20]
    res["eager_kernels_us"] = {k[:80]: {"count": c, "total_us": t} for k, (c, t) in top}
    res["eager_kernel_sum_us"] = sum(t for _, (c, t) in agg.items())
    # 4) kernels of one 8192-token prefill step (4 prompts of 2048), the throughput benchmark's shape
    if a.prefill:
        lens = [2048] * 4
        nblk = sum(-(-n // runner.block_size) for n in lens)
        pmeta = runner._dummy_meta(lens, min(nblk + 1, runner.num_kv_blocks))
        ids = torch.randint(100, 30000, (sum(lens),), device=runner.device)
        pos = torch.cat([torch.arange(n, device=runner.device) for n in lens])
        with torch.inference_mode():
            for _ in range(2):
                runner.model(ids, pos, runner.kv_caches, pmeta)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.model(ids, pos, runner.kv_caches, pmeta)
            torch.cuda.synchronize()
            res["prefill_8192_ms"] = (time.perf_counter() - t0) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.model(ids, pos, runner.kv_caches, pmeta)
                torch.cuda.synchronize()
        agg = kernel_times(prof)
        top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:12]
        res["prefill_kernels_ms"] = {k[:70]: round(t / 1e3, 2) for k, (c, t) in top}
    emit(res, a.output_json)


if __name__ == "__main__":
    main()
