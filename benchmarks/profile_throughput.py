"""Where does a throughput run's time go? Runs N requests of input/output length through the engine
(as `hopperllm bench throughput` does) and classifies every engine step by what it scheduled: pure
decode, pure prefill, or mixed; reports the count, the total and mean wall time of each class, and the
batch shapes. With async scheduling a step's wall time is the loop period, i.e. what the GPU step costs
when the host keeps up.

    python benchmarks/profile_throughput.py --model dummy:llama-3-8b --num-prompts 600
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict

import numpy as np
from _report import emit  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--profile-steps", type=int, default=3, help="torch-profile this many mixed steps (0: none)"
    )
    p.add_argument("--cprofile-steps", type=int, default=0, help="cProfile this many mixed steps (host time)")
    p.add_argument(
        "--window-steps", type=int, default=0,
        help="torch-profile this many consecutive steps without synchronizing (the steady state) and report "
        "how much of the window the GPU was busy and its largest idle gaps",
    )  # fmt: skip
    p.add_argument(
        "--step-gaps", action="store_true",
        help="CUDA events around every step's launch (no profiler): the GPU's idle time at each step boundary, "
        "the host's time between launches, and the garbage collector's pauses",
    )  # fmt: skip
    p.add_argument("--gc-off", action="store_true", help="gc.disable() for the timed run")
    p.add_argument("--window-at", type=int, default=20, help="the window starts after this many mixed steps")
    p.add_argument(
        "--window-cuda-only", action="store_true",
        help="trace only the GPU in the window (no host op records, whose cost can itself starve the GPU)",
    )  # fmt: skip
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    llm = LLM(
        model=a.model, quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, show_progress=False,
    )  # fmt: skip
    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.output_len)
    eng.add_request("warm", {"prompt_token_ids": [5] * 16}, SamplingParams(max_tokens=4))
    while eng.has_unfinished_requests():
        eng.step()
    for i in range(a.num_prompts):
        ids = rng.integers(100, 30000, a.input_len).tolist()
        eng.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    last = {}
    orig = eng.scheduler.schedule

    def schedule():
        out = orig()
        nd = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        npf = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)
        last["kind"] = "decode" if npf == 0 and nd else ("prefill" if nd == 0 else "mixed")
        last["nd"], last["npf"] = nd, npf
        return out

    eng.scheduler.schedule = schedule
    # host time inside launch (enqueue) and collect (wait for the device + read back), per step
    phase = {"launch": 0.0, "collect": 0.0}

    def timed(name, fn):
        def w(*args, **kw):
            t0 = time.perf_counter()
            r = fn(*args, **kw)
            phase[name] += time.perf_counter() - t0
            return r

        return w

    eng.executor.launch = timed("launch", eng.executor.launch)
    gaps = StepGaps(eng) if a.step_gaps else None
    eng.executor.collect = timed("collect", eng.executor.collect)
    import torch

    mem0 = torch.cuda.memory_stats()
    walls = defaultdict(list)
    stats = defaultdict(lambda: {"steps": 0, "s": 0.0, "decodes": 0, "prefill_tokens": 0})
    if a.gc_off:
        gc.disable()
    t_start = t = time.perf_counter()
    prof_kernels: dict = {}
    prof_cpu: dict = {}
    profiled = 0
    cprof_done = False
    window = None
    while eng.has_unfinished_requests():
        last.clear()
        if a.window_steps and window is None and stats["mixed"]["steps"] >= a.window_at:
            window = gpu_idle_window(eng, a.window_steps, a.window_cuda_only)
            print(json.dumps(window, indent=1))
            continue
        if profiled < a.profile_steps and stats["mixed"]["steps"] >= 20:
            # profile one whole step (host + GPU) once mixed steps are the steady state
            import torch
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                eng.step()
                torch.cuda.synchronize()
            profiled += 1
            for ev in prof.key_averages():
                dev_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
                if dev_us:
                    prof_kernels[ev.key[:90]] = prof_kernels.get(ev.key[:90], 0) + dev_us / 1e3
                if ev.self_cpu_time_total:
                    prof_cpu[ev.key[:90]] = prof_cpu.get(ev.key[:90], 0) + ev.self_cpu_time_total / 1e3
            print(f"profiled step kind={last.get('kind')} decodes={last.get('nd')} prefill={last.get('npf')}")
        elif a.cprofile_steps and stats["mixed"]["steps"] >= 20 and not cprof_done:
            import cProfile
            import io
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.cprofile_steps):
                eng.step()
            pr.disable()
            cprof_done = True
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
            print(buf.getvalue()[-9000:])
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
            print(buf.getvalue()[-6000:])
        else:
            eng.step()
        now = time.perf_counter()
        k = last.get("kind", "empty")
        st = stats[k]
        st["steps"] += 1
        st["s"] += now - t
        st["decodes"] += last.get("nd", 0)
        st["prefill_tokens"] += last.get("npf", 0)
        st.setdefault("launch_s", 0.0)
        st.setdefault("collect_s", 0.0)
        st["launch_s"] += phase["launch"]
        st["collect_s"] += phase["collect"]
        phase["launch"] = phase["collect"] = 0.0
        walls[k].append((now - t) * 1e3)
        t = now
    total = time.perf_counter() - t_start
    gc.enable()
    res = {
        "model": a.model, "num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len,
        "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
        "elapsed_s": total, "output_tok_per_s": a.num_prompts * a.output_len / total, "classes": {},
    }  # fmt: skip
    mem1 = torch.cuda.memory_stats()
    res["allocator"] = {
        k: mem1.get(k, 0) - mem0.get(k, 0)
        for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    }
    for k, st in stats.items():
        n = max(st["steps"], 1)
        w = np.array(walls[k]) if walls[k] else np.zeros(1)
        res["classes"][k] = {
            "wall_ms_p10_p50_p90_max": [round(float(np.percentile(w, q)), 1) for q in (10, 50, 90, 100)],
            "launch_ms_mean": round(st.get("launch_s", 0.0) / n * 1e3, 2),
            "collect_ms_mean": round(st.get("collect_s", 0.0) / n * 1e3, 2),
        }
        res["classes"][k] |= {
            "steps": st["steps"], "total_s": round(st["s"], 3), "mean_ms": round(st["s"] / n * 1e3, 2),
            "mean_decodes": round(st["decodes"] / n, 1), "mean_prefill_tokens": round(st["prefill_tokens"] / n, 1),
        }  # fmt: skip
    if profiled:
        top = sorted(prof_kernels.items(), key=lambda kv: -kv[1])[:25]
        res["profiled_steps"] = profiled
        res["gpu_ms_per_profiled_step"] = {k: round(v / profiled, 2) for k, v in top}
        res["gpu_ms_total_per_step"] = round(sum(prof_kernels.values()) / profiled, 2)
        top = sorted(prof_cpu.items(), key=lambda kv: -kv[1])[:20]
        res["cpu_self_ms_per_profiled_step"] = {k: round(v / profiled, 2) for k, v in top}
    if window is not None:
        res["window"] = window
    if gaps is not None:
        res["step_gaps"] = gaps.report()
    emit(res, a.output_json)


class StepGaps:
    """Events on the stream before and after each launch (the executor's `launch`: inputs staged, model,
    sampling, read-back enqueued). Without a profiler's per-op cost: the GPU's idle time between one step's
    last work and the next step's first is elapsed(end N, start N+1) (the start event runs when the GPU
    reaches it, at once if the GPU was idle). Also per step: the host's time from one launch's return to the
    next launch's call (read-back, outputs, scheduling: the work during which only the queued tail of the
    step runs), the launch call's own time, and the garbage collector's pauses inside that interval."""

    def __init__(self, eng):
        import torch

        self.torch = torch
        self.kinds: list[str] = []
        self.events: list[tuple] = []
        self.host: list[tuple[float, float]] = []  # (call, return) perf_counter of each launch
        self.gc_pauses: list[tuple[float, float, int]] = []
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc_cb)
        orig = eng.executor.launch

        def launch(sched_out, *args, **kw):
            t0 = time.perf_counter()
            s = torch.cuda.Event(enable_timing=True)
            s.record()
            r = orig(sched_out, *args, **kw)
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            nd = sum(1 for x in sched_out.scheduled if x.num_new_tokens == 1)
            npf = sum(x.num_new_tokens for x in sched_out.scheduled if x.num_new_tokens > 1)
            self.kinds.append("decode" if npf == 0 else ("prefill" if nd == 0 else "mixed"))
            self.events.append((s, e))
            self.host.append((t0, time.perf_counter()))
            return r

        eng.executor.launch = launch

    def _gc_cb(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_pauses.append((self._gc_t0, time.perf_counter(), info.get("generation", -1)))

    def report(self) -> dict:
        self.torch.cuda.synchronize()
        gc.callbacks.remove(self._gc_cb)
        rows = []
        for i in range(1, len(self.events)):
            idle = self.events[i - 1][1].elapsed_time(self.events[i][0])  # ms
            gpu = self.events[i][0].elapsed_time(self.events[i][1])
            between = (self.host[i][0] - self.host[i - 1][1]) * 1e3
            call = (self.host[i][1] - self.host[i][0]) * 1e3
            lo, hi = self.host[i - 1][1], self.host[i][0]
            gcms = sum((min(e, hi) - max(s, lo)) * 1e3 for s, e, _ in self.gc_pauses if s < hi and e > lo)
            rows.append((self.kinds[i - 1], self.kinds[i], idle, gpu, between, call, gcms))
        out: dict = {"gc_pauses": {}}
        for g in (0, 1, 2):
            d = [(e - s) * 1e3 for s, e, gen in self.gc_pauses if gen == g]
            out["gc_pauses"][f"gen{g}"] = {
                "count": len(d),
                "total_ms": round(sum(d), 1),
                "max_ms": round(max(d, default=0), 2),
            }
        for kind in ("mixed", "decode"):
            rs = [r for r in rows if r[1] == kind]  # boundaries before a step of this kind
            if not rs:
                continue
            idle = np.array([r[2] for r in rs])
            out[f"before_{kind}"] = {
                "boundaries": len(rs),
                "gpu_idle_ms_total": round(float(idle.sum()), 1),
                "gpu_idle_ms_p50_p90_max": [round(float(np.percentile(idle, q)), 2) for q in (50, 90, 100)],
                "boundaries_idle_over_1ms": int((idle > 1).sum()),
                "step_gpu_ms_p50": round(float(np.median([r[3] for r in rs])), 2),
                "host_between_launches_ms_p50_p90_max": [
                    round(float(np.percentile([r[4] for r in rs], q)), 2) for q in (50, 90, 100)
                ],
                "launch_call_ms_p50_p90_max": [
                    round(float(np.percentile([r[5] for r in rs], q)), 2) for q in (50, 90, 100)
                ],
                "gc_ms_in_idle_boundaries": round(sum(r[6] for r in rs if r[2] > 1), 1),
            }
        worst = sorted(rows, key=lambda r: -r[2])[:8]
        out["largest"] = [
            {"from": r[0], "to": r[1], "gpu_idle_ms": round(r[2], 2), "host_between_ms": round(r[4], 2),
             "launch_call_ms": round(r[5], 2), "gc_ms": round(r[6], 2)}
            for r in worst
        ]  # fmt: skip
        return out


def gpu_idle_window(eng, steps: int, cuda_only: bool = False) -> dict:
    """Profile `steps` consecutive engine steps as they run (no synchronization inside the window): the
    window's wall time, the union of its GPU kernel / copy intervals, and the largest gaps between them
    with the kernels on either side and the host calls that ran across each gap."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    if cuda_only:  # the raw trace (kernels without their host ops), in us
        events = []
        gpu = sorted(
            (e.start_ns() / 1e3, e.end_ns() / 1e3, e.name())
            for e in prof.profiler.kineto_results.events()
            if e.device_type() == DeviceType.CUDA and e.end_ns() > e.start_ns()
        )
    else:
        events = list(prof.events())
        gpu = sorted(
            (e.time_range.start, e.time_range.end, e.name)
            for e in events
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
        )
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if not gpu:
        return {"steps": steps, "error": "no GPU events"}
    t0 = min(e.time_range.start for e in cpu) if cpu else gpu[0][0]
    t1 = gpu[-1][1]
    busy, cur_s, cur_e = 0.0, gpu[0][0], gpu[0][1]
    gaps = []
    prev_name = gpu[0][2]
    for s, e, name in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, s, prev_name, name))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        if e >= cur_e:
            prev_name = name
    busy += cur_e - cur_s
    gaps.sort(reverse=True)
    top = []
    for g, gs, ge, before, after in gaps[:12]:
        host = sorted(
            ((min(ev.time_range.end, ge) - max(ev.time_range.start, gs), ev.name) for ev in cpu
             if ev.time_range.start < ge and ev.time_range.end > gs and ev.name.startswith(("aten::", "cuda", "cu"))),
            reverse=True,
        )[:4]  # fmt: skip
        top.append({"gap_us": round(g, 1), "after_kernel": before[:70], "before_kernel": after[:70],
                    "host_calls_in_gap": [(n[:60], round(d, 1)) for d, n in host]})  # fmt: skip
    gap_hist = {f">={lo}us": round(sum(g[0] for g in gaps if g[0] >= lo) / 1e3, 2) for lo in (10, 100, 1000)}
    per_kernel: dict[str, float] = defaultdict(float)
    for s, e, name in gpu:
        per_kernel[name[:70]] += e - s
    top_kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {
        "steps": steps,
        "wall_ms": round((t1 - t0) / 1e3, 2),
        "gpu_span_ms": round((t1 - gpu[0][0]) / 1e3, 2),
        "gpu_busy_ms": round(busy / 1e3, 2),
        "gpu_idle_ms_in_span": round((t1 - gpu[0][0] - busy) / 1e3, 2),
        "idle_ms_in_gaps_of": gap_hist,
        "largest_gaps": top,
        # summed durations (kernels overlapping under PDL each count in full), per step
        "kernel_us_per_step": {k: round(v / steps, 1) for k, v in top_kernels},
    }


if __name__ == "__main__":
    main()
