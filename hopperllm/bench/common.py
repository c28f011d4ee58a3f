"""Shared pieces of the `hopperllm bench` commands: the result record, percentiles, prompts, tables.

Every `--output-json` file is one record with the same top level (see docs/benchmarks.md):

    benchmark, timestamp, device, gpu_count, tensor_parallel_size, versions, git_commit,
    model, dtype, quantization, kv_cache_dtype, args, results

`results` holds the figures of the benchmark kind, each documented in its module's docstring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


# -- environment ------------------------------------------------------------------------------
def device_info() -> tuple[str, int]:
    """(device name, GPU count): torch.cuda's name of GPU 0, or "cpu" and 0."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.device_count()
    return "cpu", 0


def versions() -> dict[str, str | None]:
    import platform

    import torch

    import hopperllm

    out: dict[str, str | None] = {
        "hopperllm": hopperllm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # absent or broken: not ours to fix here
            out[name] = None
    return out


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout the package runs from ($HOPPERLLM_GIT_COMMIT where the tree was
    copied without its history, as on the device machine), or None."""
    if os.environ.get("HOPPERLLM_GIT_COMMIT"):
        return os.environ["HOPPERLLM_GIT_COMMIT"]
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=pkg_dir, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = r.stdout.strip()
    return commit if r.returncode == 0 and commit else None


def make_record(
    benchmark: str,
    args: argparse.Namespace,
    results: dict[str, Any],
    *,
    model: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    tensor_parallel_size: int | None = None,
    scheduler: dict[str, int] | None = None,
    startup: dict[str, Any] | None = None,
    speculative: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record every bench command writes. Engine fields default to the parsed flags;
    `scheduler` holds the limits the engine resolved (defaults included), `startup` what the engine's
    start-up made (KV blocks, CUDA graphs and their capture time)."""
    device, gpu_count = device_info()
    return {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "gpu_count": gpu_count,
        "tensor_parallel_size": tensor_parallel_size
        if tensor_parallel_size is not None
        else getattr(args, "tensor_parallel_size", 1),
        "versions": versions(),
        "git_commit": git_commit(),
        # the HOPPERLLM_* switches the run was made under (A/B runs differ only in these)
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith("HOPPERLLM_") and k not in ("HOPPERLLM_API_KEY", "HOPPERLLM_GIT_COMMIT")
        },
        "model": model if model is not None else getattr(args, "model", None),
        "dtype": dtype if dtype is not None else getattr(args, "dtype", None),
        "quantization": quantization if quantization is not None else getattr(args, "quantization", None),
        "kv_cache_dtype": kv_cache_dtype
        if kv_cache_dtype is not None
        else getattr(args, "kv_cache_dtype", None),
        "args": args_dict(args),
        **({"scheduler": scheduler} if scheduler is not None else {}),
        **({"startup": startup} if startup is not None else {}),
        **({"speculative": speculative} if speculative is not None else {}),
        "results": results,
    }


def engine_fields(engine) -> dict[str, Any]:
    """make_record's engine keywords, read from a built LLMEngine (resolved dtype, fp8 KV, ...)."""
    cfg = engine.config
    return {
        "model": cfg.model or "default (SmolLM2-135M-Instruct)",
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "quantization": cfg.quantization,
        "kv_cache_dtype": cfg.cache_config.kv_cache_dtype,
        "tensor_parallel_size": cfg.parallel_config.tensor_parallel_size,
        "scheduler": {
            "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        },
        "startup": engine.executor.collective_rpc("startup_stats"),
        "speculative": speculative_fields(engine),
    }


def speculative_fields(engine) -> dict[str, Any] | None:
    """Speculative decoding's config and its drafts so far (warm-up included), or None without it."""
    spec = engine.config.speculative_config
    if spec is None:
        return None
    drafted, accepted, runs = engine.num_draft_tokens, engine.num_accepted_tokens, engine.num_drafts
    return {
        "method": spec.method,
        "model": spec.model,
        "num_speculative_tokens": spec.num_speculative_tokens,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        # vLLM's mean acceptance length: tokens a drafting sequence gained a step (its accepted drafts + its own)
        "mean_acceptance_length": 1 + accepted / runs if runs else None,
        "accepted_per_position": list(engine.accepted_per_pos),
    }


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if callable(v):
            continue  # the subcommand's handler
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out


def write_json(path: str | None, record: dict[str, Any], quiet: bool = False) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:  # written whole, then renamed: a reader never sees half a record
        json.dump(_finite(record), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as null (and request_rate inf as the string "inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x == math.inf else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# -- statistics -------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default, as vLLM's benchmarks use); None when empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def summarize(values: Sequence[float], percentiles: Iterable[float] = PERCENTILES, scale: float = 1.0):
    """{"mean", "median", "std", "p50", "p90", "p99", ...} of `values * scale` (None where empty)."""
    v = np.asarray(values, dtype=np.float64) * scale
    empty = v.size == 0
    out: dict[str, float | None] = {
        "mean": None if empty else float(v.mean()),
        "median": None if empty else float(np.median(v)),
        "std": None if empty else float(v.std()),
    }
    for p in percentiles:
        out[f"p{pct_name(p)}"] = None if empty else float(np.percentile(v, p))
    return out


def pct_name(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key spelling)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what} is empty")
    return vals


def parse_int_list(text: str, what: str) -> list[int]:
    vals = parse_float_list(text, what)
    if any(v != int(v) or v < 1 for v in vals):
        raise ValueError(f"{what} must be positive integers separated by commas, got {text!r}")
    return [int(v) for v in vals]


# -- prompts ----------------------------------------------------------------------------------
def random_token_ids(rng: np.random.Generator, num: int, length: int, vocab_size: int) -> list[list[int]]:
    """`num` random prompts of `length` token ids; ids below 10 (special tokens) are avoided."""
    low = min(10, vocab_size - 1)
    return rng.integers(low, vocab_size, size=(num, length)).tolist()


def prompt_vocab_size(engine) -> int:
    """Token ids safe to use in random prompts: those both the model and its tokenizer know."""
    vocab = engine.config.model_config.vocab_size
    try:
        vocab = min(vocab, int(engine.tokenizer.vocab_size))
    except (AttributeError, TypeError):
        pass
    return vocab


def read_dataset(path: str) -> list[dict[str, Any]]:
    """JSONL rows with "prompt" (text) or "prompt_token_ids", and optionally "output_len"."""
    from hopperllm.entrypoints.cli import _read_jsonl  # the same JSONL reading as `generate --input`

    rows = _read_jsonl(path)
    for i, row in enumerate(rows, 1):
        if not ({"prompt", "prompt_token_ids"} & row.keys()):
            raise ValueError(f"{path}: prompt {i} needs 'prompt' or 'prompt_token_ids' (not 'messages')")
        n = row.get("output_len", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{path}: prompt {i}: output_len must be a positive integer")
    return rows


def take(rows: list[dict[str, Any]], num: int | None) -> list[dict[str, Any]]:
    """The first `num` rows, cycling through the dataset when it is shorter."""
    if num is None:
        return list(rows)
    return [rows[i % len(rows)] for i in range(num)]


# -- output -----------------------------------------------------------------------------------
def print_table(title: str, rows: Sequence[tuple[str, Any]], width: int = 50) -> None:
    """vLLM's result block: a '=' title bar, `label: value` lines, '-' section bars for (title, None)."""
    print(f"{' ' + title + ' ':=^{width}}")
    for label, value in rows:
        if value is None and label.startswith("--"):
            print(f"{' ' + label.strip('- ') + ' ':-^{width}}")
            continue
        print(f"{label + ':':<40}{_fmt(value):<10}")
    print("=" * width)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.4g}"
        return f"{v:.2f}"
    return str(v)


def check_positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


# -- engine -----------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, **overrides):
    """An LLMEngine from the parsed engine flags (`EngineArgs.add_cli_args`), seeded like `LLM`."""
    import dataclasses
    import sys

    import torch

    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.engine.llm_engine import LLMEngine

    engine_args = dataclasses.replace(EngineArgs.from_cli_args(args), **overrides)
    torch.manual_seed(engine_args.seed)
    return LLMEngine.from_engine_args(engine_args, show_progress=sys.stderr.isatty())


def check_fits(args: argparse.Namespace, input_len: int, output_len: int, prefix_len: int = 0) -> None:
    """Fail before loading the model when input_len + output_len exceeds max_model_len (outputs would
    stop short and TPOT and throughput would be wrong). Reads the model's config, not its weights."""
    from hopperllm.engine.arg_utils import EngineArgs

    cfg, _ = EngineArgs.from_cli_args(args).create_engine_config()
    limit = cfg.scheduler_config.max_model_len
    if prefix_len + input_len + output_len > limit:
        prefix = f"--prefix-len {prefix_len} + " if prefix_len else ""
        raise ValueError(
            f"{prefix}--input-len {input_len} + --output-len {output_len} exceeds max_model_len {limit}: "
            "shorten them or raise --max-model-len"
        )


def free_memory() -> None:
    """Give back the GPU memory of engines the caller has dropped (`del engine` first): the KV cache
    takes most of the GPU, and the HF baseline runs after ours in the same process."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_to_completion(engine, on_output=None) -> None:
    """Step until the engine holds no request; `on_output(RequestOutput, now)` sees every output."""
    import time

    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        if on_output is not None:
            for out in outs:
                on_output(out, now)
