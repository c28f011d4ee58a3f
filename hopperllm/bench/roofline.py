"""`hopperllm bench roofline`: the fastest a model and shape can run on a Hopper GPU, from bytes and FLOPs.

    hopperllm bench roofline --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8 \
        --input-len 2048 --output-len 128 --batch-size 1 --gpu h100
    hopperllm bench roofline --measured-json benchmarks/results/latency.json   # floor beside measured

The floor of each phase is the larger of its memory time (bytes / copy bandwidth) and its compute time
(FLOPs / tensor-core rate), plus the tensor-parallel all-reduces (bytes / NVLink bandwidth, and
`--allreduce-latency-us` each, 0 by default). Per GPU, with tensor parallelism splitting the weights,
the KV heads and the FLOPs `tensor_parallel_size` ways:

- prefill: FLOPs = 2 * linear params * B * S + 2 * lm_head params * B (logits of the last token only)
  + attention 4 * layers * heads * head_dim * B * S(S+1)/2 (causal); bytes = weights + the KV written.
- decode step at context c (the prompt, earlier outputs and the token fed in): bytes = weights +
  B * c * KV bytes per token; FLOPs = 2 * (linear + lm_head params) * B + 4 * layers * heads * head_dim * B * c.
  There are output_len - 1 of them (the prefill yields the first token).
- KV bytes per token = 2 (K and V) * layers * kv_heads * head_dim * bytes per element.

Weights read per step are the linear layers (FP8: 1 byte a parameter) and the LM head (model dtype;
ours stays unquantized); embedding rows are gathered, not streamed. Linear FLOPs run at the weights'
rate (FP8 or bf16), attention at the bf16 rate. Activations are not counted.

`results` in the JSON:
    gpu {name, bandwidth_tbps, fp8_tflops, bf16_tflops, nvlink_gbps, memory_gib}
    input_len, output_len, batch_size, tensor_parallel_size
    num_params, linear_params, lm_head_params, weight_bytes_per_gpu, kv_bytes_per_token,
    kv_bytes_per_token_per_gpu, memory_per_gpu_bytes, fits_in_memory
    prefill, decode_step_first, decode_step_mean, decode_step_last
        each {flops, bytes, compute_s, memory_s, comm_s, floor_s, bound ("memory" or "compute")}
    decode_steps, decode_s, ttft_floor_s (= prefill), tpot_floor_s (= mean step), total_s
    measured (with --measured-json)  {source, e2e_s, ttft_s, tpot_s}
    pct_of_floor (with --measured-json) {e2e, ttft, tpot}: floor / measured * 100
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from hopperllm.bench import common
from hopperllm.config import ModelConfig


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bandwidth_tbps: float  # device-memory copy bandwidth, TB/s (10^12 bytes/s)
    fp8_tflops: float  # dense FP8 tensor-core rate, TFLOP/s
    bf16_tflops: float  # dense bf16 tensor-core rate, TFLOP/s
    nvlink_gbps: float  # NVLink bandwidth per GPU per direction, GB/s
    memory_gib: float


# H100: copy bandwidth and GEMM rates measured (FP8 and bf16 at 8192^3); H200: datasheet-ish bandwidth,
# the same SMs and so the same FLOP rates. NVLink 4: 900 GB/s per GPU both ways, 450 each way.
GPUS = {
    "h100": GPUSpec("H100 SXM", 2.93, 1400.0, 800.0, 450.0, 80.0),
    "h200": GPUSpec("H200 SXM", 4.3, 1400.0, 800.0, 450.0, 141.0),
}


@dataclass(frozen=True)
class Phase:
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    def to_dict(self) -> dict:
        return {**asdict(self), "floor_s": self.floor_s, "bound": self.bound}


def kv_bytes_per_token(mc: ModelConfig, kv_bytes_per_elem: float) -> float:
    """K and V of one token over all layers: 2 * layers * kv_heads * head_dim * bytes."""
    return mc.kv_elems_per_token * kv_bytes_per_elem


def param_counts(mc: ModelConfig) -> dict[str, int]:
    """Parameters by role: linear (attention + MLP projections), lm_head, embedding, norms."""
    h, L = mc.hidden_size, mc.num_hidden_layers
    linear = mc.linear_params
    lm_head = mc.vocab_size * h
    embed = 0 if mc.tie_word_embeddings else mc.vocab_size * h
    norms = (2 * L + 1) * h
    return {
        "linear_params": linear,
        "lm_head_params": lm_head,
        "embed_params": embed,
        "norm_params": norms,
        "num_params": linear + lm_head + embed + norms,
    }


def roofline_floor(
    mc: ModelConfig,
    gpu: GPUSpec,
    *,
    input_len: int,
    output_len: int,
    batch_size: int = 1,
    weight_bytes_per_param: float = 2.0,
    kv_bytes_per_elem: float = 2.0,
    act_bytes: float = 2.0,
    tensor_parallel_size: int = 1,
    allreduce_latency_us: float = 0.0,
) -> dict:
    """The latency floor of `batch_size` requests of input_len prompt and output_len output tokens.
    `act_bytes` is the model dtype: the LM head's weights and the all-reduced activations."""
    tp = tensor_parallel_size
    counts = param_counts(mc)
    linear, lm_head = counts["linear_params"], counts["lm_head_params"]
    bw = gpu.bandwidth_tbps * 1e12
    w_rate = (gpu.fp8_tflops if weight_bytes_per_param <= 1 else gpu.bf16_tflops) * 1e12
    attn_rate = gpu.bf16_tflops * 1e12
    kv_tok = kv_bytes_per_token(mc, kv_bytes_per_elem)
    kv_shards = min(tp, mc.num_key_value_heads)  # fewer KV heads than GPUs: heads are replicated
    kv_tok_gpu = kv_tok / kv_shards
    weight_bytes = (linear * weight_bytes_per_param + lm_head * act_bytes) / tp
    attn_per_ctx = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim / tp
    B, S = batch_size, input_len

    def comm(tokens: int) -> float:
        if tp == 1:
            return 0.0
        size = tokens * mc.hidden_size * act_bytes  # two ring all-reduces per layer
        per = 2 * (tp - 1) / tp * size / (gpu.nvlink_gbps * 1e9) + allreduce_latency_us * 1e-6
        return 2 * mc.num_hidden_layers * per

    def phase(lin_flops: float, attn_flops: float, nbytes: float, tokens: int) -> Phase:
        return Phase(
            flops=lin_flops + attn_flops,
            bytes=nbytes,
            compute_s=lin_flops / w_rate + attn_flops / attn_rate,
            memory_s=nbytes / bw,
            comm_s=comm(tokens),
        )

    prefill = phase(
        (2 * linear * B * S + 2 * lm_head * B) / tp,
        attn_per_ctx * B * S * (S + 1) / 2,
        weight_bytes + B * S * kv_tok_gpu,
        B * S,
    )

    def step(ctx: int) -> Phase:
        return phase(
            2 * (linear + lm_head) * B / tp, attn_per_ctx * B * ctx, weight_bytes + B * ctx * kv_tok_gpu, B
        )

    steps = [step(S + k) for k in range(1, output_len)]
    decode_s = sum(p.floor_s for p in steps)
    if steps:
        n = len(steps)
        mean = Phase(*(sum(getattr(p, f) for p in steps) / n for f in Phase.__dataclass_fields__))
    else:
        mean = Phase(0.0, 0.0, 0.0, 0.0, 0.0)
    kv_bytes_total = B * (S + output_len) * kv_tok_gpu
    memory_per_gpu = weight_bytes + (counts["embed_params"] * act_bytes) / tp + kv_bytes_total
    return {
        "input_len": S,
        "output_len": output_len,
        "batch_size": B,
        "tensor_parallel_size": tp,
        **counts,
        "weight_bytes_per_param": weight_bytes_per_param,
        "kv_bytes_per_elem": kv_bytes_per_elem,
        "weight_bytes_per_gpu": weight_bytes,
        "kv_bytes_per_token": kv_tok,
        "kv_bytes_per_token_per_gpu": kv_tok_gpu,
        "memory_per_gpu_bytes": memory_per_gpu,
        "fits_in_memory": memory_per_gpu <= gpu.memory_gib * 2**30,
        "prefill": prefill.to_dict(),
        "decode_step_first": steps[0].to_dict() if steps else None,
        "decode_step_mean": mean.to_dict(),
        "decode_step_last": steps[-1].to_dict() if steps else None,
        "decode_steps": len(steps),
        "decode_s": decode_s,
        "ttft_floor_s": prefill.floor_s,
        "tpot_floor_s": mean.floor_s,
        "total_s": prefill.floor_s + decode_s,
    }


# -- CLI --------------------------------------------------------------------------------------
def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="dummy:<preset> or the bare preset (default llama-2-7b), HF dir, .gguf, config.json",
    )
    p.add_argument("--dtype", default=None, help="model dtype: bfloat16 (default) or float16")
    p.add_argument("--quantization", "-q", default=None, choices=["fp8"], help="FP8 weights")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8", "fp8_e4m3"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 2048)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="concurrent requests (default 1)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="GPU spec (default h100)")
    p.add_argument("--bandwidth-tbps", type=float, default=None, help="override the memory bandwidth")
    p.add_argument("--tflops", type=float, default=None, help="override the weights' tensor-core rate")
    p.add_argument("--allreduce-latency-us", type=float, default=0.0, help="fixed cost of each all-reduce")
    p.add_argument("--measured-json", default=None, help="a `bench latency` JSON: show measured beside floor")
    p.add_argument("--output-json", default=None, help="write the record (args, figures) here")


def _model_config(model: str | None) -> tuple[ModelConfig, dict]:
    from hopperllm.loader.dummy import PRESETS

    if model is None:
        model = "dummy:llama-2-7b"
    if model in PRESETS:
        model = "dummy:" + model
    if model.endswith(".json") and os.path.isfile(model):
        with open(model) as f:
            hf = json.load(f)
    else:
        from hopperllm.loader.model_loader import resolve_model

        hf = resolve_model(model).hf_config
    return ModelConfig.from_hf_dict(hf), hf


def _fill_from_measured(args) -> dict | None:
    """Read --measured-json; flags left unset take the measured run's values."""
    if not args.measured_json:
        return None
    if not os.path.isfile(args.measured_json):
        raise ValueError(f"--measured-json {args.measured_json!r} does not exist")
    with open(args.measured_json) as f:
        rec = json.load(f)
    if rec.get("benchmark") != "latency" or "results" not in rec:
        raise ValueError(f"{args.measured_json} is not a `hopperllm bench latency` record")
    margs = rec.get("args", {})
    for key in ("model", "quantization", "input_len", "output_len", "batch_size", "tensor_parallel_size"):
        if getattr(args, key) is None:
            setattr(args, key, margs.get(key))
    if args.kv_cache_dtype is None:
        args.kv_cache_dtype = rec.get("kv_cache_dtype")
    if args.dtype is None and rec.get("dtype") in ("bfloat16", "float16"):
        args.dtype = rec["dtype"]
    if args.gpu is None and "H200" in (rec.get("device") or ""):
        args.gpu = "h200"
    r = rec["results"]
    return {
        "source": args.measured_json,
        "device": rec.get("device"),
        "e2e_s": r.get("avg_latency"),
        "ttft_s": (r.get("ttft_ms") or {}).get("mean", 0) / 1e3 if r.get("ttft_ms") else None,
        "tpot_s": (r.get("tpot_ms") or {}).get("mean", 0) / 1e3
        if (r.get("tpot_ms") or {}).get("mean")
        else None,
    }


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from hopperllm.loader.fp8_checkpoints import checkpoint_fp8_format, kv_cache_is_fp8

    measured = _fill_from_measured(args)
    args.input_len = args.input_len or 2048
    args.output_len = args.output_len or 128
    args.batch_size = args.batch_size or 1
    args.tensor_parallel_size = args.tensor_parallel_size or 1
    args.gpu = args.gpu or "h100"
    args.dtype = args.dtype or "bfloat16"
    for name in ("input_len", "output_len", "batch_size", "tensor_parallel_size"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    act_bytes = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "auto": 2, "float32": 4}.get(
        args.dtype
    )
    if act_bytes is None:
        raise ValueError(f"unknown --dtype {args.dtype!r}: use bfloat16, float16 or float32")
    mc, hf = _model_config(args.model)
    qc = hf.get("quantization_config")
    fp8_weights = args.quantization == "fp8" or bool(qc and checkpoint_fp8_format(qc))
    fp8_kv = (args.kv_cache_dtype or "auto").startswith("fp8") or (
        args.kv_cache_dtype in (None, "auto") and bool(qc) and kv_cache_is_fp8(qc)
    )
    gpu = GPUS[args.gpu]
    if args.bandwidth_tbps is not None:
        gpu = dataclasses.replace(gpu, bandwidth_tbps=args.bandwidth_tbps)
    if args.tflops is not None:
        gpu = dataclasses.replace(gpu, **{"fp8_tflops" if fp8_weights else "bf16_tflops": args.tflops})
    if gpu.bandwidth_tbps <= 0 or gpu.fp8_tflops <= 0 or gpu.bf16_tflops <= 0:
        raise ValueError("--bandwidth-tbps and --tflops must be positive")
    r = roofline_floor(
        mc,
        gpu,
        input_len=args.input_len,
        output_len=args.output_len,
        batch_size=args.batch_size,
        weight_bytes_per_param=1.0 if fp8_weights else act_bytes,
        kv_bytes_per_elem=1.0 if fp8_kv else act_bytes,
        act_bytes=act_bytes,
        tensor_parallel_size=args.tensor_parallel_size,
        allreduce_latency_us=args.allreduce_latency_us,
    )
    results = {"gpu": asdict(gpu), **r}
    if measured is not None:
        results["measured"] = measured
        results["pct_of_floor"] = {
            k: (results[f] / measured[m] * 100 if measured.get(m) else None)
            for k, f, m in (
                ("e2e", "total_s", "e2e_s"),
                ("ttft", "ttft_floor_s", "ttft_s"),
                ("tpot", "tpot_floor_s", "tpot_s"),
            )
        }
    _print_summary(args, results)
    rec = common.make_record(
        "roofline",
        args,
        results,
        model=args.model or "dummy:llama-2-7b",
        dtype=args.dtype,
        quantization="fp8" if fp8_weights else None,
        kv_cache_dtype="fp8" if fp8_kv else "auto",
        tensor_parallel_size=args.tensor_parallel_size,
    )
    rec["device"] = gpu.name + " (modelled)"  # the machine this ran on is not the one modelled
    rec["gpu_count"] = args.tensor_parallel_size
    common.write_json(args.output_json, rec)
    return 0


def _print_summary(args, r: dict) -> None:
    g = r["gpu"]
    ms = 1e3
    rows: list[tuple[str, object]] = [
        ("Model", args.model or "dummy:llama-2-7b"),
        ("Parameters (B)", r["num_params"] / 1e9),
        ("GPU", f"{args.tensor_parallel_size} x {g['name']}"),
        (
            "TB/s, FP8 / bf16 TFLOP/s",
            f"{g['bandwidth_tbps']}, {g['fp8_tflops']:.0f} / {g['bf16_tflops']:.0f}",
        ),
        ("Input / output len, batch size", f"{args.input_len} / {args.output_len}, {args.batch_size}"),
        (
            "Bytes per weight / per KV element",
            f"{r['weight_bytes_per_param']:g} / {r['kv_bytes_per_elem']:g}",
        ),
        ("Weights per GPU (GB)", r["weight_bytes_per_gpu"] / 1e9),
        ("KV per token, all GPUs (KiB)", r["kv_bytes_per_token"] / 1024),
        ("Fits in GPU memory", r["fits_in_memory"]),
        ("-- Prefill --", None),
        (
            "Compute / memory / comm (ms)",
            "{:.2f} / {:.2f} / {:.2f}".format(
                *(r["prefill"][k] * ms for k in ("compute_s", "memory_s", "comm_s"))
            ),
        ),
        ("Prefill floor = TTFT floor (ms)", r["ttft_floor_s"] * ms),
        ("-- Decode --", None),
        ("Steps", r["decode_steps"]),
        (
            "Step compute / memory / comm (ms)",
            "{:.3f} / {:.3f} / {:.3f}".format(
                *(r["decode_step_mean"][k] * ms for k in ("compute_s", "memory_s", "comm_s"))
            ),
        ),
        ("Mean step floor = TPOT floor (ms)", r["tpot_floor_s"] * ms),
        ("Decode floor (ms)", r["decode_s"] * ms),
        ("-- Total --", None),
        ("End-to-end floor (s)", r["total_s"]),
    ]
    if "measured" in r:
        m, pct = r["measured"], r["pct_of_floor"]
        rows.append(("-- Measured (floor / measured) --", None))
        for label, key, pk, scale, unit in (
            ("E2E", "e2e_s", "e2e", 1, "s"),
            ("TTFT", "ttft_s", "ttft", ms, "ms"),
            ("TPOT", "tpot_s", "tpot", ms, "ms"),
        ):
            val = m.get(key)
            rows.append((f"Measured {label} ({unit})", None if val is None else val * scale))
            rows.append((f"{label} floor / measured (%)", pct[pk]))
    common.print_table("Roofline", rows)
