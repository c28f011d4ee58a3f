"""The host's share of an engine step, without a GPU: everything the engine does around the model (scheduling,
the step's input arrays, sampling metadata, reading tokens back, stop checks, detokenization, output
objects), with the model's forward and LM head replaced by zeros on the CPU (`dummy:tiny`, so the argmax of
a 512-token vocabulary is all the sampler does). A decode step's GPU work at large batches is a few
milliseconds (Llama-3-8B at ~190 sequences of 2k context reads ~25 GB of KV cache): where this host time
comes close, decode steps are host-bound. Reports the step time per class (decode-only, mixed) and batch
size, and with --profile the functions that take it.

    python benchmarks/host_overhead.py --num-requests 512 --input-len 1900 --output-len 128 --output-kind final
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import time
from collections import defaultdict

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from hopperllm import LLM, RequestOutputKind, SamplingParams

KINDS = {"cumulative": RequestOutputKind.CUMULATIVE, "delta": RequestOutputKind.DELTA,
         "final": RequestOutputKind.FINAL_ONLY}  # fmt: skip


class _ZeroModel(torch.nn.Module):
    """The model's interface with no work: hidden states and logits of zeros."""

    def __init__(self, model, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, input_ids, positions, kv_caches, meta, keep_rows=None):
        return torch.zeros(input_ids.shape[0] if keep_rows is None else keep_rows.shape[0], 8)

    def compute_logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.vocab)

    def attention_layers(self):
        return self.model.attention_layers()


def run(num_requests, input_len, output_len, max_num_seqs, max_num_batched_tokens, output_kind, profile_steps=0,
        async_scheduling=True) -> dict:  # fmt: skip
    llm = LLM(model="dummy:tiny", device="cpu", dtype="float32", show_progress=False, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens,
              num_kv_blocks=-(-num_requests * (input_len + output_len) // 16) + 16)  # fmt: skip
    eng = llm.engine
    runner = eng.executor.runner
    runner.model = _ZeroModel(runner.model, runner.vocab_size)
    eng.async_scheduling = async_scheduling
    rng = np.random.default_rng(0)
    params = SamplingParams(
        temperature=0.0, ignore_eos=True, max_tokens=output_len, output_kind=KINDS[output_kind]
    )
    for i in range(num_requests):
        eng.add_request(
            f"r{i}", {"prompt_token_ids": rng.integers(3, runner.vocab_size, input_len).tolist()}, params
        )
    orig = eng.scheduler.schedule
    last = {}

    def schedule():
        out = orig()
        last["decode"] = bool(out.scheduled) and all(s.num_new_tokens == 1 for s in out.scheduled)
        last["n"] = len(out.scheduled)
        return out

    eng.scheduler.schedule = schedule
    steps = defaultdict(list)
    pauses: list[tuple[int, float]] = []  # (generation, ms) of each garbage collection during the run
    gc_t0 = [0.0]

    def gc_cb(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            pauses.append((info.get("generation", -1), (time.perf_counter() - gc_t0[0]) * 1e3))

    gc.callbacks.append(gc_cb)
    prof = cProfile.Profile() if profile_steps else None
    profiled = 0
    t_start = time.perf_counter()
    while eng.has_unfinished_requests():
        on = prof is not None and profiled < profile_steps and steps["decode"] and last.get("decode")
        if on:
            prof.enable()
        t = time.perf_counter()
        eng.step()
        dt = (time.perf_counter() - t) * 1e3
        if on:
            prof.disable()
            profiled += 1
        steps["decode" if last.get("decode") else "mixed"].append((last.get("n", 0), dt))
    gc.callbacks.remove(gc_cb)
    import platform

    from hopperllm.bench.common import git_commit, versions

    res = {
        "benchmark": "host_overhead", "device": f"cpu: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (host work only: the model is zeros)", "versions": versions(),
        "git_commit": git_commit(), "num_requests": num_requests, "input_len": input_len,
        "output_len": output_len, "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
        "output_kind": output_kind, "async_scheduling": async_scheduling,
        "elapsed_s": time.perf_counter() - t_start, "classes": {},
    }  # fmt: skip
    for kind, rows in steps.items():
        if not rows:
            continue
        n = np.array([r[0] for r in rows])
        ms = np.array([r[1] for r in rows])
        buckets = {}
        for lo, hi in ((1, 64), (64, 128), (128, 256), (256, 512), (512, 1 << 30)):
            sel = (n >= lo) & (n < hi)
            if sel.any():
                buckets[f"{lo}-{hi - 1 if hi < 1 << 30 else ''}"] = {
                    "steps": int(sel.sum()), "median_ms": float(np.median(ms[sel])),
                    "us_per_seq": float(np.median(ms[sel] / n[sel]) * 1e3),
                }  # fmt: skip
        res["classes"][kind] = {"steps": len(rows), "median_ms": float(np.median(ms)),
                                "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
                                "by_batch": buckets}  # fmt: skip
    # the collector's pauses land inside steps: a full (generation 2) one walks every tracked container the
    # requests hold (each prompt's token list among them), a stall for every running request at once
    res["gc_pauses"] = {
        f"gen{g}": {"count": len(d), "total_ms": round(sum(d), 1), "max_ms": round(max(d, default=0.0), 2)}
        for g in (0, 1, 2)
        for d in [[ms for gen, ms in pauses if gen == g]]
    }
    if prof is not None and profiled:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        res["profile_top"] = buf.getvalue().splitlines()[:40]
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--input-len", type=int, default=1900)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--output-kind", choices=list(KINDS), default="final", help="final: as LLM.generate asks")
    p.add_argument("--profile-steps", type=int, default=0, help="cProfile this many decode-only steps")
    p.add_argument("--sync", action="store_true", help="without async scheduling")
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    emit(run(a.num_requests, a.input_len, a.output_len, a.max_num_seqs, a.max_num_batched_tokens, a.output_kind,
             a.profile_steps, not a.sync), a.output_json)  # fmt: skip


if __name__ == "__main__":
    main()
