"""What steps does a throughput run schedule? Drives the engine's own Scheduler (no model, no GPU) through
N requests of input/output length, as `hopperllm bench throughput` submits them, and classifies every step:
decode-only, prefill-only or mixed, with its decodes and prefill tokens; and sums the KV bytes the decodes
read (each decode reads its whole context: the floor of decode attention over the run).

    python benchmarks/simulate_schedule.py --num-prompts 1000 --max-num-seqs 256 512 1024

Steps here are synchronous (a token is known as soon as its step is scheduled); the async engine finds a
finished sequence one step later, so it runs one more decode-only step at the very end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hopperllm.config import CacheConfig, SchedulerConfig  # noqa: E402
from hopperllm.engine.scheduler import Scheduler  # noqa: E402
from hopperllm.engine.sequence import Sequence, SequenceStatus  # noqa: E402
from hopperllm.sampling_params import SamplingParams  # noqa: E402


def simulate(num_prompts: int, input_len: int, output_len: int, max_num_seqs: int, max_num_batched_tokens: int,
             num_kv_blocks: int, block_size: int = 16) -> dict:  # fmt: skip
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=input_len + output_len),
        CacheConfig(block_size=block_size, enable_prefix_caching=False),
        num_kv_blocks,
    )  # fmt: skip
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i in range(num_prompts):
        # distinct prompts, as the benchmark's random ones (no prefix hits either way: caching is off)
        sched.add_seq(Sequence(f"r{i}", [i % 30000 + 1] * input_len, params))
    classes: dict[str, dict] = defaultdict(lambda: {"steps": 0, "decodes": 0, "prefill_tokens": 0})
    decode_keys = 0  # sum over decodes of the keys each one attends to
    while sched.has_unfinished_seqs():
        out = sched.schedule()
        if out.is_empty:
            raise RuntimeError("the scheduler scheduled nothing with requests left (cache too small?)")
        nd = npf = 0
        for item in out.scheduled:
            if item.seq.num_computed_tokens >= item.seq.num_prompt_tokens:
                nd += 1
                decode_keys += item.seq.num_computed_tokens + 1
            else:
                npf += item.num_new_tokens
        kind = "decode" if npf == 0 else ("prefill" if nd == 0 else "mixed")
        c = classes[kind]
        c["steps"] += 1
        c["decodes"] += nd
        c["prefill_tokens"] += npf
        for seq in sched.update_after_step(out):
            seq.append_token(1)
            if seq.num_output_tokens >= output_len:
                sched.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
    res = {
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
        "preemptions": sched.num_preemptions, "decode_keys": decode_keys, "classes": {},
    }  # fmt: skip
    for kind, c in sorted(classes.items()):
        n = c["steps"]
        res["classes"][kind] = {
            **c,
            "mean_decodes": c["decodes"] / n,
            "mean_prefill_tokens": c["prefill_tokens"] / n,
        }
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, nargs="+", default=[512])
    p.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[8192])
    p.add_argument(
        "--num-kv-blocks", type=int, default=100_000, help="cache blocks (one H200: ~118k for the 8B)"
    )
    p.add_argument(
        "--kv-bytes-per-token", type=int, default=65536,
        help="K + V bytes of one key over all layers (Llama-3-8B, FP8 cache: 32 x 8 x 128 x 2)",
    )  # fmt: skip
    p.add_argument("--read-tbps", type=float, default=4.25, help="measured read rate for the floor (TB/s)")
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    runs = []
    for seqs in a.max_num_seqs:
        for tokens in a.max_num_batched_tokens:
            r = simulate(a.num_prompts, a.input_len, a.output_len, seqs, tokens, a.num_kv_blocks)
            r["decode_kv_tb"] = r["decode_keys"] * a.kv_bytes_per_token / 1e12
            r["decode_kv_floor_s"] = r["decode_kv_tb"] / a.read_tbps
            runs.append(r)
            parts = ", ".join(
                f"{k} {c['steps']} steps ({c['mean_decodes']:.0f} decodes + {c['mean_prefill_tokens']:.0f} prefill tokens)"
                for k, c in r["classes"].items()
            )
            print(f"seqs {seqs} tokens {tokens}: {parts}; decode KV {r['decode_kv_tb']:.1f} TB "
                  f"({r['decode_kv_floor_s']:.2f} s at {a.read_tbps} TB/s)")  # fmt: skip
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
