"""Where a batch-1 prefill's time goes: host enqueue against device time. Builds the engine once and, for a
few 2048-token prompts, times engine.step()'s first call (the prefill's launch: with async scheduling it
returns without waiting for the device), then the wait for the device, then the step that returns the first
token. A TTFT that varies between processes while the device time does not is host time.

    python benchmarks/ttft_probe.py --model dummy:llama-2-7b --iters 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-2-7b")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    llm = LLM(model=a.model, quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=16, show_progress=False,
              enable_prefix_caching=False)  # fmt: skip
    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2)
    rows = []
    for i in range(a.iters + 2):
        torch.cuda.synchronize()
        eng.add_request(f"r{i}", {"prompt_token_ids": rng.integers(100, 30000, a.input_len).tolist()}, params)
        t0 = time.perf_counter()
        eng.step()  # schedules and launches the prefill
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        t3 = time.perf_counter()
        if i >= 2:
            rows.append(
                {"launch_ms": (t1 - t0) * 1e3, "device_done_ms": (t2 - t0) * 1e3, "end_ms": (t3 - t0) * 1e3}
            )
    res = {"model": a.model, "input_len": a.input_len, "rows": rows}
    for k in ("launch_ms", "device_done_ms", "end_ms"):
        res[k + "_median"] = float(np.median([r[k] for r in rows]))
    print({k: round(v, 2) for k, v in res.items() if k.endswith("median")})
    emit(res, a.output_json)


if __name__ == "__main__":
    main()
