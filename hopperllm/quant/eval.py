"""Accuracy of a (quantized) model: perplexity on held-out text and top-1 agreement with a reference.

Perplexity: the text's tokens are cut into consecutive, non-overlapping chunks of `context_len` tokens;
each chunk runs as one prompt through the engine's paged path (`ModelRunner.logits_for_tokens`: KV-cache
write, then attention over the cache, so an FP8 KV cache is exercised), and every position but each
chunk's first is scored: ppl = exp(mean over scored positions of -log p(next token)).

Top-1 agreement: the fraction of scored positions where the model's argmax equals the reference model's
argmax on the same tokens (teacher forced: both see the true text, so one disagreement does not derail
the rest as it would in free-running greedy decoding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from hopperllm.quant.calibrate import chunk_tokens

# `--quantization` values eval understands: the engine's, plus weight-only and activation-only emulation
EVAL_QUANTIZATIONS = ("none", "fp8", "fp8-weight-only", "fp8-activation-only")
# `--kv-cache-dtype` values: a dtype runs an FP8 checkpoint's KV cache unquantized
EVAL_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16", "float32")


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_scored_tokens: int
    top1_accuracy: float  # argmax == the text's next token
    argmax: torch.Tensor  # int64 [num_scored_tokens], for top-1 agreement

    def summary(self) -> dict[str, float | int]:
        d = asdict(self)
        d.pop("argmax")
        return d


def runner_of(llm):
    """The model runner of a single-process LLM (eval and calibration drive it directly)."""
    runner = getattr(llm.engine.executor, "runner", None)
    if runner is None:
        raise ValueError("evaluation and calibration run on one GPU: use --tensor-parallel-size 1")
    return runner


def load_llm(
    model: str | None,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    context_len: int = 512,
    show_progress: bool = False,
):
    """An LLM sized for one prompt of `context_len` tokens at a time. Emulations, activations computed
    unquantized unless said: `quantization="fp8-weight-only"` replaces each linear weight by its FP8
    (per-channel) round trip, or for an FP8 checkpoint runs its weights dequantized; "fp8-activation-only"
    keeps unquantized weights and gives every linear layer's input its per-token FP8 round trip."""
    from hopperllm import LLM
    from hopperllm.quant.fp8 import (
        dequantize_fp8_weights_,
        fake_quantize_activations_,
        fake_quantize_weights_,
    )

    if quantization not in (None, *EVAL_QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantization!r}: use one of {', '.join(EVAL_QUANTIZATIONS)}")
    if context_len < 2:
        raise ValueError(f"--context-len must be at least 2, got {context_len}")
    emulated = quantization in ("fp8-weight-only", "fp8-activation-only")
    engine_quant = None if quantization in (None, "none") or emulated else quantization
    block_size = 16
    llm = LLM(
        model=model,
        dtype=dtype,
        quantization=engine_quant,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=context_len,
        max_num_seqs=1,
        max_num_batched_tokens=context_len,
        block_size=block_size,
        num_kv_blocks=-(-context_len // block_size) + 1,
        enable_prefix_caching=False,
        enforce_eager=True,
        device=device,
        show_progress=show_progress,
    )
    net = runner_of(llm).model
    if quantization == "fp8-weight-only":
        if not dequantize_fp8_weights_(net):
            fake_quantize_weights_(net)
    elif quantization == "fp8-activation-only":
        if has_fp8_weights(llm):
            raise ValueError(
                "fp8-activation-only runs unquantized weights: evaluate an unquantized checkpoint"
            )
        fake_quantize_activations_(net)
    return llm


def has_fp8_weights(llm) -> bool:
    """Whether the LLM's linear layers run FP8 (quantized on load, or an FP8 checkpoint)."""
    from hopperllm.layers.linear import LinearBase

    return any(
        isinstance(m, LinearBase) and m.quantization is not None for m in runner_of(llm).model.modules()
    )


def eval_token_ids(tokenizer, max_tokens: int | None = None, text: str | None = None) -> list[int]:
    """The held-out evaluation text (`calibrate.eval_text()`), tokenized without special tokens."""
    from hopperllm.quant.calibrate import eval_text

    ids = tokenizer.encode(text if text is not None else eval_text(), add_special_tokens=False)
    return ids[:max_tokens] if max_tokens else ids


@torch.inference_mode()
def perplexity(
    llm, token_ids: list[int], context_len: int, show_progress: bool = True, desc: str = "Perplexity"
) -> PerplexityResult:
    """Perplexity of `token_ids` under `llm` in chunks of `context_len` tokens (module docstring)."""
    runner = runner_of(llm)
    chunks = chunk_tokens(token_ids, context_len)
    if not chunks:
        raise ValueError("the evaluation text has fewer than 2 tokens: raise --max-tokens")
    nll_sum = 0.0
    correct = 0
    argmaxes = []
    bar = tqdm(total=sum(len(c) - 1 for c in chunks), desc=desc, unit="tok", disable=not show_progress)
    for chunk in chunks:
        logits = runner.logits_for_tokens(chunk)[:-1].float()
        target = torch.tensor(chunk[1:], device=logits.device)
        logp = torch.log_softmax(logits, dim=-1)
        nll_sum += float(-logp.gather(1, target[:, None]).sum())
        top = logits.argmax(dim=-1)
        correct += int((top == target).sum())
        argmaxes.append(top.cpu())
        bar.update(len(chunk) - 1)
        done = sum(len(a) for a in argmaxes)
        bar.set_postfix_str(f"ppl {math.exp(nll_sum / done):.3f}")
    bar.close()
    n = sum(len(c) - 1 for c in chunks)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / n),
        mean_nll=nll_sum / n,
        num_scored_tokens=n,
        top1_accuracy=correct / n,
        argmax=torch.cat(argmaxes),
    )


def top1_agreement(a: PerplexityResult, b: PerplexityResult) -> float:
    """Fraction of positions where two runs over the same tokens pick the same argmax token."""
    if a.argmax.shape != b.argmax.shape:
        raise ValueError("top-1 agreement needs both runs over the same tokens and context length")
    return float((a.argmax == b.argmax).float().mean())
