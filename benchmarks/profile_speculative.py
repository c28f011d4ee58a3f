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
        d_chain = d.launch_draft_chain
        d.launch_draft_chain = timed("draft.launch_draft_chain", d_chain)
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
    # the profiled steps run unsynchronized, each host phase a labeled range: where the GPU idles, which phase
    # the host was in (the innermost labeled range at each idle microsecond)
    labeled_fns = [(ex, n, n) for n in orig] + [(eng, "step", "step")]
    if runner_exec is not None:
        d.launch, d.launch_draft_chain, d.execute_model = d_launch, d_chain, runner_exec
        labeled_fns += [(d, "launch", "draft.launch"), (d, "launch_draft_chain", "draft.launch_draft_chain"),
                        (d, "collect", "draft.collect")]  # fmt: skip
    saved = [(obj, n, getattr(obj, n)) for obj, n, _ in labeled_fns]
    for obj, n, label in labeled_fns:
        setattr(obj, n, _labeled(label, getattr(obj, n)))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.profile_steps):
            eng.step()
        cuda and torch.cuda.synchronize()
    for obj, n, f in saved:
        setattr(obj, n, f)
    if cuda:
        res["gpu_timeline"] = gpu_idle_by_phase(prof, a.profile_steps)
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


def _labeled(label, fn):
    def w(*args, **kw):
        with torch.profiler.record_function("@" + label):
            return fn(*args, **kw)

    return w


def gpu_idle_by_phase(prof, steps: int) -> dict:
    """From a profile of `steps` engine steps: the GPU's busy time (the union of its kernels and copies) and
    idle time a step between the first and last of them, and the idle time split by the host phase (labeled
    range, innermost) that was running meanwhile ("other": none)."""
    from torch.autograd import DeviceType

    events = prof.events()
    dev = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    ranges = sorted(
        (e.time_range.start, e.time_range.end, e.name[1:])
        for e in events
        if e.device_type == DeviceType.CPU and e.name.startswith("@")
    )
    if not dev:
        return {}
    busy, gaps = 0.0, []
    cur_s, cur_e = dev[0]
    for s, e in dev[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = dev[-1][1] - dev[0][0]
    by_phase: dict[str, float] = defaultdict(float)
    for a, b in gaps:  # 1 us resolution
        for t in np.arange(a, b, 1.0):
            inner = [r for r in ranges if r[0] <= t < r[1]]
            label = max(inner, key=lambda r: r[0])[2] if inner else "other"
            by_phase[label] += min(1.0, b - t)
    return {
        "span_ms_per_step": span / 1e3 / steps,
        "busy_ms_per_step": busy / 1e3 / steps,
        "idle_ms_per_step": (span - busy) / 1e3 / steps,
        "idle_ms_per_step_by_host_phase": {
            k: v / 1e3 / steps for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])
        },
        "gaps_over_20us_per_step": sum(1 for a, b in gaps if b - a > 20) / steps,
    }


if __name__ == "__main__":
    main()
