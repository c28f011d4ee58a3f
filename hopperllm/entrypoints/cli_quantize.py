"""`hopperllm quantize`: calibrate a model on text, quantize it to FP8, write a ModelOpt-style checkpoint.

    hopperllm quantize --output smollm2-fp8                          # default model, per-channel weights
    hopperllm quantize --model DIR --output OUT --kv-cache-dtype fp8 --static-activations --per-tensor
    hopperllm quantize --output OUT --kv-cache-dtype fp8 --algorithm gptq --keep-last-layers 2
    hopperllm quantize --output OUT --kv-cache-dtype fp8 --center-v   # V cache centered through biases
    hopperllm quantize --output OUT --kv-cache-dtype fp8 --algorithm gptq --dtype float32 --distill-tokens 16384
                                                   # + norms and weight scales distilled from the model

The written directory loads back with `--model OUT` (the FP8 format and KV-cache dtype are detected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model to FP8 and write a ModelOpt-style HF checkpoint",
        description="Run the unquantized model over calibration text (default: the first 80% of Python's "
        "pydoc_data.topics), take activation and K/V ranges, quantize the linear layers to FP8 (e4m3) "
        "and write an HF checkpoint in NVIDIA ModelOpt's format.",
    )
    p.add_argument(
        "--model", default=None, help="HF directory, .gguf file or dummy:<preset> (default: SmolLM2)"
    )
    p.add_argument("--output", "-o", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3"],
        help="fp8: calibrate and write per-layer k_scale / v_scale (the checkpoint then runs an FP8 KV cache)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=True,
        help="one weight scale per output channel (default)",
    )
    g.add_argument(
        "--per-tensor", dest="per_channel", action="store_false", help="one weight scale per matrix"
    )
    p.add_argument(
        "--static-activations",
        action="store_true",
        help="calibrated per-tensor input scales (default: dynamic per-token scales at run time)",
    )
    p.add_argument(
        "--algorithm",
        default="rtn",
        help="how weights are rounded to FP8: rtn (round to nearest, default) or gptq (error feedback on "
        "calibration inputs, layer by layer; same scales and checkpoint format)",
    )
    p.add_argument(
        "--gptq-damp",
        type=float,
        default=None,
        help="GPTQ dampening, a fraction of the Hessian's mean diagonal (default 0.01)",
    )
    p.add_argument("--gptq-block-size", type=int, default=None, help="GPTQ columns per block (default 128)")
    p.add_argument(
        "--gptq-act-order",
        action="store_true",
        default=None,
        help="GPTQ rounds columns by decreasing activation energy (default: in order)",
    )
    p.add_argument(
        "--ignore",
        "--exclude-modules",
        dest="ignore",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="linear layers to keep unquantized: checkpoint names, wildcards ('model.layers.29.*') or "
        "'re:' regexes; written to the checkpoint's ignore list",
    )
    p.add_argument(
        "--keep-last-layers",
        type=int,
        default=0,
        metavar="N",
        help="keep the linear layers of the last N decoder layers unquantized (added to --ignore)",
    )
    p.add_argument(
        "--center-v",
        action="store_true",
        help="subtract each V channel's calibration mean through v_proj's bias and add it back through "
        "o_proj's bias (exact: attention weights sum to 1), so the FP8 V cache and o_proj's FP8 input round "
        "smaller values; writes attention_bias: true",
    )
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument(
        "--calib-seq-len", type=int, default=512, help="tokens per calibration chunk (default 512)"
    )
    p.add_argument("--calib-file", default=None, help="a UTF-8 text file to calibrate on instead")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the unquantized tensors written (embeddings, norms, LM head; default bfloat16)",
    )
    d = p.add_argument_group(
        "distillation",
        "Quantization-aware distillation (hopperllm/quant/distill.py): after quantizing, train the RMSNorm gains "
        "and per-channel weight scales (FP8 codes and KV scales fixed) so that the FP8 model's next-token "
        "distributions match the unquantized model's on calibration text. Needs per-channel weights and "
        "dynamic activations; runs in float32 on the model's device.",
    )
    d.add_argument(
        "--distill-tokens",
        type=int,
        default=0,
        metavar="N",
        help="calibration tokens to distill on (default 0: no distillation; measured: 16384)",
    )
    d.add_argument(
        "--distill-val-tokens",
        type=int,
        default=2048,
        metavar="N",
        help="the calibration tokens after those, scored after each epoch (and picking the kept epoch with "
        "--distill-average-last 0; default 2048)",
    )
    d.add_argument("--distill-epochs", type=int, default=6, help="passes over the tokens (default 6)")
    d.add_argument("--distill-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    d.add_argument("--distill-accum", type=int, default=4, help="chunks averaged into each step (default 4)")
    d.add_argument("--distill-seed", type=int, default=0, help="seed of the chunk order (default 0)")
    d.add_argument(
        "--distill-average-last",
        type=int,
        default=None,
        metavar="N",
        help="keep the mean of the last N epochs' parameters (default 3, or every epoch if fewer; 0: the "
        "epoch with the lowest validation KL)",
    )
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from hopperllm.config import resolve_dtype
    from hopperllm.loader.fp8_checkpoints import ignored_linear_layers
    from hopperllm.loader.model_loader import resolve_model
    from hopperllm.quant.calibrate import calibrate, calibration_text, chunk_tokens, read_text_file
    from hopperllm.quant.center import center_v_cache_, v_means
    from hopperllm.quant.checkpoint import FP8Scheme, resolve_ignore, write_modelopt_checkpoint
    from hopperllm.quant.eval import has_fp8_weights, load_llm, runner_of
    from hopperllm.quant.gptq import GPTQConfig, check_algorithm, gptq_quantize_model

    if args.calib_tokens < 1:
        raise ValueError(f"--calib-tokens must be at least 1, got {args.calib_tokens}")
    if args.calib_seq_len < 2:
        raise ValueError(f"--calib-seq-len must be at least 2, got {args.calib_seq_len}")
    if args.max_shard_size <= 0:
        raise ValueError("--max-shard-size must be positive")
    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise ValueError(f"output {args.output!r} exists and is not an empty directory: choose a new path")
    gptq = check_algorithm(args.algorithm) == "gptq"
    gptq_args = {
        "damp": args.gptq_damp,
        "block_size": args.gptq_block_size,
        "act_order": args.gptq_act_order,
    }
    gptq_args = {k: v for k, v in gptq_args.items() if v is not None}
    if gptq_args and not gptq:
        flags = ", ".join(f"--gptq-{k.replace('_', '-')}" for k in gptq_args)
        raise ValueError(f"{flags} apply to --algorithm gptq only")
    gptq_config = GPTQConfig(**gptq_args)
    distill_config = _distill_config(args)
    text = read_text_file(args.calib_file, "calibration file")
    show = sys.stderr.isatty()
    t0 = time.perf_counter()
    llm = load_llm(
        args.model, dtype="auto", device=args.device, context_len=args.calib_seq_len, show_progress=show
    )
    if has_fp8_weights(llm):
        raise ValueError("the model is already FP8-quantized: quantize starts from bf16/fp32 weights")
    runner = runner_of(llm)
    scheme = FP8Scheme(
        per_channel=args.per_channel,
        static_activations=args.static_activations,
        kv_cache_fp8=args.kv_cache_dtype.startswith("fp8"),
        ignore=resolve_ignore(runner.model, args.ignore, args.keep_last_layers),
    )
    tok = llm.get_tokenizer()
    text_ids = tok.encode(text if text is not None else calibration_text(), add_special_tokens=False)
    ids = text_ids[: args.calib_tokens]
    chunks = chunk_tokens(ids, args.calib_seq_len, min_len=1)
    if not chunks:
        raise ValueError("the calibration text is empty")
    if distill_config is not None:
        from hopperllm.quant.distill import split_text

        distill_train, distill_val = split_text(text_ids, distill_config)
    if args.center_v:  # before the ranges: V and o_proj's input are taken centered
        centered = center_v_cache_(
            runner.model, v_means(runner.model, runner.logits_for_tokens, chunks, show)
        )
    # activation and KV-cache ranges of the unquantized model: the same for both algorithms
    stats = calibrate(runner.model, runner.logits_for_tokens, chunks, show_progress=show)
    if distill_config is not None:  # the teacher: the unquantized model (before GPTQ rounds its weights)
        from hopperllm.quant.distill import teacher_log_probs

        teacher_train = teacher_log_probs(runner.logits_for_tokens, distill_train)
        teacher_val = teacher_log_probs(runner.logits_for_tokens, distill_val)
    codes = None
    if gptq:
        skip = ignored_linear_layers(runner.model, list(scheme.ignore))
        codes = gptq_quantize_model(
            runner.model, runner.logits_for_tokens, chunks, scheme.per_channel, gptq_config, skip, show
        )
    src = llm.engine.config.model
    source_dir = src if src is not None and os.path.isdir(src) else None
    hf_config = resolve_model(src).hf_config  # the source's config.json (or the one a GGUF implies)
    if args.center_v:
        hf_config = {**hf_config, "attention_bias": True}
    summary = write_modelopt_checkpoint(
        runner.model,
        hf_config,
        tok,
        args.output,
        scheme,
        stats,
        dtype=resolve_dtype(args.dtype, "cpu"),
        source_dir=source_dir,
        max_shard_bytes=int(args.max_shard_size * 2**30),
        codes=codes,
    )
    distilled = ""
    if distill_config is not None:
        from hopperllm.quant.distill import FP8Student, distill, load_checkpoint_tensors, write_tuned_tensors

        device = next(runner.model.parameters()).device
        del llm, runner  # the student holds its own float32 copy
        with open(os.path.join(args.output, "config.json")) as f:
            student = FP8Student(json.load(f), load_checkpoint_tensors(args.output), device)
        result = distill(
            student, distill_train, distill_val, teacher_train, teacher_val, distill_config,
            log=lambda msg: print(msg, file=sys.stderr),
        )  # fmt: skip
        n = write_tuned_tensors(args.output, student.tuned_tensors())
        distilled = (
            f"; distilled {n} tensors on {distill_config.tokens} tokens (validation KL "
            f"{result['val_kl_before']:.5f} -> {result['val_kl']:.5f}, {result['kept']})"
        )
    elapsed = time.perf_counter() - t0
    kv = "FP8 KV cache scales" if scheme.kv_cache_fp8 else "no KV-cache scales"
    kept = f", {len(scheme.ignore)} linear modules kept unquantized" if scheme.ignore else ""
    if args.center_v:
        kept += f", V cache centered in {centered} layers"
    print(
        f"wrote {summary['output']}: {summary['quant_algo']} "
        f"({'per-channel' if scheme.per_channel else 'per-tensor'} weights rounded by {args.algorithm}, "
        f"{'static' if scheme.static_activations else 'dynamic'} activations, {kv}{kept}), "
        f"{summary['num_tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB in {len(summary['files'])} file(s); "
        f"calibrated on {stats.num_tokens} tokens{distilled} in {elapsed:.1f} s"
    )
    return 0


def _distill_config(args: argparse.Namespace):
    """The DistillConfig of --distill-* (None without --distill-tokens); rejects what it cannot train."""
    from hopperllm.quant.distill import DistillConfig

    if args.distill_tokens < 0:
        raise ValueError(f"--distill-tokens must be at least 0, got {args.distill_tokens}")
    if args.distill_tokens == 0:
        return None
    if not args.per_channel:
        raise ValueError("--distill-tokens trains per-channel weight scales: drop --per-tensor")
    if args.static_activations:
        raise ValueError("--distill-tokens models dynamic per-token activations: drop --static-activations")
    if args.ignore or args.keep_last_layers:
        raise ValueError(
            "--distill-tokens needs every linear layer in FP8: drop --ignore / --keep-last-layers"
        )
    config = DistillConfig(
        tokens=args.distill_tokens,
        val_tokens=args.distill_val_tokens,
        chunk=args.calib_seq_len,
        epochs=args.distill_epochs,
        lr=args.distill_lr,
        accum=args.distill_accum,
        seed=args.distill_seed,
        average_last=args.distill_average_last,
    )
    config.check()
    return config
