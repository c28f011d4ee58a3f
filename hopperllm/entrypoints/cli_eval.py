"""`hopperllm eval perplexity`: perplexity on held-out text, and top-1 agreement with a reference run.

    hopperllm eval perplexity --quantization fp8 --kv-cache-dtype fp8 --reference-model
    hopperllm eval perplexity --model smollm2-fp8 --reference-model /path/to/bf16 --output-json r.json

The text is the held-out 20% of Python's `pydoc_data.topics` (disjoint from what `hopperllm quantize`
calibrates on), or `--text-file`. A bare `--reference-model` compares with the same model unquantized.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(sub) -> None:
    from hopperllm.quant.eval import EVAL_KV_CACHE_DTYPES, EVAL_QUANTIZATIONS

    p = sub.add_parser("eval", help="accuracy evaluations (perplexity, top-1 agreement)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser(
        "perplexity",
        help="perplexity on held-out text, and top-1 agreement with a reference model",
        description="Perplexity over consecutive chunks of --context-len tokens through the engine's paged "
        "path; with --reference-model, also the fraction of positions whose argmax token matches the "
        "reference's.",
    )
    pp.add_argument(
        "--model", default=None, help="HF directory, .gguf file or dummy:<preset> (default: SmolLM2)"
    )
    pp.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=EVAL_QUANTIZATIONS,
        help="fp8: FP8 weights and activations (on the fly); fp8-weight-only: FP8 weights dequantized (an FP8 "
        "checkpoint's own), activations unquantized; fp8-activation-only: unquantized weights, FP8 "
        "per-token activations (both emulations). FP8 checkpoints are detected without it",
    )
    pp.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=EVAL_KV_CACHE_DTYPES,
        help="auto: the model dtype, or FP8 for a checkpoint calibrated for it; a dtype overrides that",
    )
    pp.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"
    )
    pp.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    pp.add_argument("--max-tokens", type=int, default=8192, help="evaluate the first N tokens (default 8192)")
    pp.add_argument("--context-len", type=int, default=512, help="tokens per chunk (default 512)")
    pp.add_argument("--text-file", default=None, help="a UTF-8 text file to evaluate on instead")
    pp.add_argument(
        "--reference-model",
        nargs="?",
        const="same",
        default=None,
        help="model to compare top-1 agreement with ('same' or no value: --model unquantized)",
    )
    pp.add_argument("--reference-quantization", default=None, choices=EVAL_QUANTIZATIONS)
    pp.add_argument("--reference-kv-cache-dtype", default="auto", choices=EVAL_KV_CACHE_DTYPES)
    pp.add_argument("--reference-dtype", default=None, help="dtype of the reference run (default: --dtype)")
    pp.add_argument("--output-json", default=None, help="write the results to this JSON file")
    pp.set_defaults(func=cmd_perplexity)


def _describe(model, quantization, llm) -> dict:
    from hopperllm.quant.eval import has_fp8_weights

    cfg = llm.engine.config
    quant = quantization or ("fp8 (checkpoint)" if has_fp8_weights(llm) else "none")
    return {
        "model": model or "default (SmolLM2-135M-Instruct GGUF)",
        "quantization": quant,
        "kv_cache_dtype": cfg.cache_config.kv_cache_dtype,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": _device_name(cfg.device),
    }


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def cmd_perplexity(args: argparse.Namespace) -> int:
    from hopperllm import __version__
    from hopperllm.quant.calibrate import read_text_file, text_source
    from hopperllm.quant.eval import eval_token_ids, load_llm, perplexity, top1_agreement

    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.context_len < 2:
        raise ValueError(f"--context-len must be at least 2, got {args.context_len}")
    text = read_text_file(args.text_file)
    show = sys.stderr.isatty()

    def run(model, quantization, kv_cache_dtype, dtype, desc):
        t0 = time.perf_counter()
        llm = load_llm(model, quantization, kv_cache_dtype, dtype, args.device, args.context_len, show)
        ids = eval_token_ids(llm.get_tokenizer(), args.max_tokens, text)
        res = perplexity(llm, ids, args.context_len, show_progress=show, desc=desc)
        info = _describe(model, quantization, llm)
        info.update(res.summary(), elapsed_s=round(time.perf_counter() - t0, 2))
        del llm
        return ids, res, info

    ids, res, info = run(args.model, args.quantization, args.kv_cache_dtype, args.dtype, "Perplexity")
    report = {
        "hopperllm": __version__,
        "eval": text_source("held-out") if text is None else {"text": args.text_file},
        "context_len": args.context_len,
        "max_tokens": args.max_tokens,
        "num_tokens": len(ids),
        "model": info,
    }
    line = f"perplexity {res.perplexity:.4f} over {res.num_scored_tokens} tokens (context {args.context_len})"
    if args.reference_model is not None:
        ref_model = args.model if args.reference_model == "same" else args.reference_model
        ref_dtype = args.reference_dtype or args.dtype
        ref_ids, ref, ref_info = run(
            ref_model, args.reference_quantization, args.reference_kv_cache_dtype, ref_dtype, "Reference"
        )
        if ref_ids != ids:
            raise ValueError(
                "the reference model tokenizes the text differently: top-1 agreement needs one vocabulary"
            )
        agreement = top1_agreement(res, ref)
        delta = res.perplexity / ref.perplexity - 1
        report.update(reference=ref_info, top1_agreement=agreement, perplexity_delta=delta)
        line += (
            f"; reference {ref.perplexity:.4f} ({delta * 100:+.2f}%); top-1 agreement {agreement * 100:.2f}%"
        )
    print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
