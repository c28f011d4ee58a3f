"""A/B of launch-level decode options on one loaded model: the batch-1 decode graph is re-captured for each
variant (PDL on/off, fp8_gemv L2 prefetch lines, SiLU chunk, decode split size, rotary inside the decode
attention launch, fused MLP mode, the decode attention's key loop, BLOCK_N and splits) and its replay timed; logits must not change (the fused MLP's may, in
the last bits of float32 sums: its tiles differ).

    python benchmarks/ab_decode.py --model dummy:llama-2-7b --variants pdl0-pf0 pdl1-pf0 pdl1-pf4
    python benchmarks/ab_decode.py --variants att103 att013n64-sp16  # tensor cores vs CUDA cores + prefetch
"""

from __future__ import annotations

import argparse
import os

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script
from _setup import start_decodes

from hopperllm import LLM
from hopperllm.kernels import activation, fp8, paged_attention
from hopperllm.layers.attention import TritonAttentionBackend
from hopperllm.models import llama
from hopperllm.worker.cuda_graphs import DecodeGraphRunner
from hopperllm.worker.profiling import timed_replays


def _variant(name: str) -> dict[str, str]:
    out = {}
    for part in name.split("-"):
        if part.startswith("pdl"):
            out["HOPPERLLM_PDL"] = part[3:]
        elif part.startswith("pf"):
            out["prefetch"] = part[2:]
        elif part.startswith("ck"):  # FP8 SiLU-mul chunk of the few-long-rows path
            out["chunk"] = part[2:]
        elif part.startswith("mt"):  # fewest keys per decode-attention split
            out["min_tokens"] = part[2:]
        elif part.startswith("rot"):  # rotary + cache write inside the decode-attention launch (1) or not (0)
            out["rotary"] = part[3:]
        elif part.startswith("mlp"):  # fused decode MLP: 0 off, 1 where measured (default), 2 everywhere
            out["mlp"] = part[3:]
        elif part.startswith("att"):  # decode-attention loop: att<PREFETCH><num_stages>[n<BLOCK_N>]
            out["att"] = part[3:]
        elif part.startswith("sp"):  # decode-attention splits of the captured batch
            out["splits"] = part[2:]
        elif part.startswith("fp16"):  # decode-attention products in float16, FP8 cache (1) or not (0)
            out["dot_fp16"] = part[4:] or "1"
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-2-7b")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--variants", nargs="+", default=["pdl0-pf0", "pdl1-pf0", "pdl1-pf4", "pdl1-pf8", "pdl0-pf4"]
    )
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    llm = LLM(
        model=a.model, quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=8, max_model_len=4096,
        enable_prefix_caching=False, gpu_memory_utilization=a.gpu_memory_utilization,
    )  # fmt: skip
    eng, runner = llm.engine, llm.engine.executor.runner
    start_decodes(eng, a.batch_size, a.context)
    gr0 = runner.graph_runner
    res = {"model": a.model, "context": a.context, "batch_size": a.batch_size, "variants": {}}
    ref_out = None
    defaults = {"chunk": activation.SPLIT_ROW_CHUNK, "min_tokens": paged_attention._MIN_TOKENS_PER_SPLIT}
    att_defaults = [dict(c) for c in paged_attention.DECODE_CONFIGS]
    for name in a.variants:
        v = _variant(name)
        os.environ["HOPPERLLM_PDL"] = v.get("HOPPERLLM_PDL", "1")
        fp8.GEMV_PREFETCH_LINES = int(v.get("prefetch", "4"))
        activation.SPLIT_ROW_CHUNK = int(v.get("chunk", defaults["chunk"]))
        paged_attention._MIN_TOKENS_PER_SPLIT = int(v.get("min_tokens", defaults["min_tokens"]))
        TritonAttentionBackend.fuse_decode_rotary = {"1": "all", "0": "none"}.get(v.get("rotary"), "mha")
        llama.FUSED_MLP = v.get("mlp", "1")
        for cfg, default in zip(paged_attention.DECODE_CONFIGS, att_defaults, strict=True):
            cfg.clear()
            cfg.update(default)
            if "att" in v:
                head, _, bn = v["att"].partition("n")
                cfg.update({"PREFETCH": head[0] == "1", "num_stages": int(head[1:])})
                if bn:
                    cfg["BLOCK_N"] = int(bn)
            if "dot_fp16" in v:
                cfg["DOT_FP16"] = v["dot_fp16"] == "1"
        try:
            gr = DecodeGraphRunner(runner, [a.batch_size])
            if "splits" in v:
                gr.num_splits[a.batch_size] = int(v["splits"])
            gr.block_tables.copy_(gr0.block_tables[: gr.max_bs])
            gr.seq_lens[: a.batch_size].fill_(a.context)
            gr.slot_mapping.fill_(-1)  # no cache writes: every replay sees the same cache
            gr.capture(show_progress=False)
            times = [timed_replays(gr.graphs[a.batch_size], a.replays) for _ in range(3)]
            out = gr.outputs[a.batch_size].float().clone()
            same = None if ref_out is None else bool(torch.equal(out, ref_out))
            ref_out = out if ref_out is None else ref_out
            res["variants"][name] = {"replay_ms": min(times), "replay_ms_all": times, "same_output": same}
            print(
                f"{name:12s} replay {min(times):.3f} ms  (runs {', '.join(f'{t:.3f}' for t in times)})  same={same}"
            )
            del gr
        except Exception as exc:  # a variant that does not compile here is reported, not fatal
            res["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name:12s} FAILED {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.synchronize()
    emit(res, a.output_json)


if __name__ == "__main__":
    main()
