"""Where does a round of draft-model speculative decoding go? One batch-1 request (a 2048-token prompt), the
engine stepping: the host phases of each step with the device synchronized around them (the draft's proposal,
the target's verify launch and read-back), then the top CUDA kernels and host ops of a few steps under the
torch profiler.

    python benchmarks/profile_speculative.py --draft dummy:llama-68m --k 4 --output-json $OUT/profile-spec.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-2-7b")
    p.add_argument("--quantization", default="fp8")
    p.add_argument("--kv-cache-dtype", default="fp8")
    p.add_argument("--draft", default="dummy:llama-68m", help="the draft model; 'none': no speculation")
    p.add_argument("--draft-quantization", default=None)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    spec = None
    if a.draft != "none":
        spec = {"model": a.draft, "num_speculative_tokens": a.k}
        if a.draft_quantization:
            spec["quantization"] = a.draft_quantization
    llm = LLM(
        model=a.model,
        quantization=a.quantization or None,
        kv_cache_dtype=a.kv_cache_dtype,
        max_model_len=a.context + 1024,
        max_num_seqs=8,
        speculative_config=spec,
    )
    eng = llm.engine
    ex = eng.executor
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, eng.config.model_config.vocab_size, a.context).tolist()
    params = SamplingParams(
        max_tokens=(a.steps + a.profile_steps + 8) * (a.k + 1), temperature=0.0, ignore_eos=True
    )
    eng.add_request("warm", {"prompt_token_ids": prompt}, params)
    for _ in range(8):
        eng.step()
    phases: dict[str, list[float]] = defaultdict(list)

    cuda = torch.cuda.is_available()

    def timed(name, fn):
        def w(*args, **kw):
            cuda and torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*args, **kw)
            cuda and torch.cuda.synchronize()
            phases[name].append(time.perf_counter() - t)
            return r

        return w

    orig = {n: getattr(ex, n) for n in ("propose_drafts", "launch", "collect")}
    for n, f in orig.items():
        setattr(ex, n, timed(n, f))
    runner_exec = None
    if getattr(ex.worker, "draft", None) is not None:
        d = ex.worker.draft
        runner_exec = d.execute_model
        d.execute_model = timed("draft.execute_model", runner_exec)
        d_launch = d.launch
        d.launch = timed("draft.launch", d_launch)
    step_times = []
    out_before = eng.num_accepted_tokens
    for _ in range(a.steps):
        t = time.perf_counter()
        eng.step()
        step_times.append(time.perf_counter() - t)
    for n, f in orig.items():
        setattr(ex, n, f)
    res = {
        "model": a.model,
        "draft": a.draft,
        "k": a.k,
        "step_ms_median": 1e3 * float(np.median(step_times)),
        "phases_ms_median": {n: 1e3 * float(np.median(v)) for n, v in phases.items()},
        "phases_calls_per_step": {n: len(v) / a.steps for n, v in phases.items()},
        "accepted_during": eng.num_accepted_tokens - out_before,
    }
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.profile_steps):
            eng.step()
        cuda and torch.cuda.synchronize()
    ka = prof.key_averages()
    tables = {
        "top_device": ka.table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25
        ),
        "top_host": ka.table(sort_by="self_cpu_time_total", row_limit=25),
    }
    emit(res, a.output_json)
    for name, table in tables.items():
        print(f"--- {name} ({a.profile_steps} steps)\n{table}")
    if a.output_json:
        with open(a.output_json.removesuffix(".json") + "-tables.txt", "w") as f:
            for name, table in tables.items():
                f.write(f"--- {name} ({a.profile_steps} steps)\n{table}\n")


if __name__ == "__main__":
    main()
