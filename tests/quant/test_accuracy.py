"""FP8 accuracy of the default model (SmolLM2-135M-Instruct, float32 on the CPU as the unquantized
baseline) on the held-out text: perplexity and top-1 agreement. docs/fp8-accuracy.md has the full table.

The fast test scores 1023 tokens (two chunks of 512). e4m3 rounds every weight, activation and cached K/V
element by up to 2^-4 (~2.5% rms); on this 135M model that costs ~+2% perplexity for the weights and
~+4% for weights, activations and KV cache together with round to nearest, ~+2.5% with GPTQ
(docs/fp8-accuracy.md), so the bounds below are regression bounds at those levels, not the 2% the issue
hoped for.
"""

from __future__ import annotations

import pytest

from hopperllm.quant.eval import eval_token_ids, load_llm, perplexity, top1_agreement

CONTEXT = 512
# GPTQ on these tokens measured +2.7% against round to nearest's +4.2%: a regression bound, and GPTQ must
# stay clearly ahead of round to nearest on the same tokens
GPTQ_BOUND = 0.035
GPTQ_MARGIN = 0.01


@pytest.fixture(scope="module")
def baseline(smollm2_gguf_path):
    llm = load_llm(None, None, "auto", dtype="float32", device="cpu", context_len=CONTEXT)
    ids = eval_token_ids(llm.get_tokenizer(), 1024)
    return ids, perplexity(llm, ids, CONTEXT, show_progress=False)


def _run(ids, quantization, kv_cache_dtype, model=None):
    llm = load_llm(model, quantization, kv_cache_dtype, dtype="float32", device="cpu", context_len=CONTEXT)
    assert eval_token_ids(llm.get_tokenizer(), len(ids)) == ids
    return perplexity(llm, ids, CONTEXT, show_progress=False)


@pytest.fixture(scope="module")
def fp8_round_to_nearest(baseline):
    """FP8 weights (round to nearest, per channel), activations and KV cache, quantized on load."""
    return _run(baseline[0], "fp8", "fp8")


def test_fp8_weights_activations_and_kv_cache(baseline, fp8_round_to_nearest):
    ids, base = baseline
    assert base.num_scored_tokens == 1022 and 5 < base.perplexity < 30
    res = fp8_round_to_nearest
    delta = res.perplexity / base.perplexity - 1
    assert 0 < delta < 0.07, delta
    assert top1_agreement(res, base) > 0.85


@pytest.mark.slow
def test_gptq_checkpoint_beats_round_to_nearest(baseline, fp8_round_to_nearest, tmp_path):
    """`hopperllm quantize --algorithm gptq --kv-cache-dtype fp8`, every layer FP8 (the best all-FP8
    configuration of docs/fp8-accuracy.md: +2.5% over float32 on the full held-out text, round to nearest
    +4.2%). Calibrated here on 1,024 tokens only, to stay within a minute."""
    from hopperllm.entrypoints.cli import main

    ids, base = baseline
    out = str(tmp_path / "smollm2-fp8-gptq")
    argv = ["quantize", "--output", out, "--kv-cache-dtype", "fp8", "--algorithm", "gptq"]
    assert main([*argv, "--dtype", "float32", "--calib-tokens", "1024", "--device", "cpu"]) == 0
    res = _run(ids, None, "auto", model=out)
    delta = res.perplexity / base.perplexity - 1
    rtn_delta = fp8_round_to_nearest.perplexity / base.perplexity - 1
    assert 0 < delta < GPTQ_BOUND and delta < rtn_delta - GPTQ_MARGIN, (delta, rtn_delta)
    assert top1_agreement(res, base) > 0.89  # measured 90.7% (round to nearest: 88.9%)


@pytest.mark.slow
def test_quantize_then_evaluate_the_checkpoint(baseline, tmp_path):
    """`hopperllm quantize` on the GGUF default (calibrated static scales, FP8 KV cache) writes a checkpoint
    whose tokenizer equals the GGUF's and whose perplexity stays close to the baseline."""
    from hopperllm.entrypoints.cli import main
    from hopperllm.loader.gguf import default_gguf_path, load_gguf_tokenizer
    from hopperllm.quant.calibrate import eval_text
    from hopperllm.tokenizer import Tokenizer

    ids, base = baseline
    out = str(tmp_path / "smollm2-fp8")
    argv = [
        "quantize",
        "--output",
        out,
        "--kv-cache-dtype",
        "fp8",
        "--static-activations",
        "--dtype",
        "float32",
    ]
    assert main([*argv, "--calib-tokens", "2048", "--device", "cpu"]) == 0
    gguf_tok, tok = load_gguf_tokenizer(default_gguf_path()), Tokenizer.from_dir(out)
    text = eval_text()[:5000]
    assert tok.encode(text) == gguf_tok.encode(text) and tok.eos_token_ids == gguf_tok.eos_token_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.encode_chat(chat) == gguf_tok.encode_chat(chat)
    res = _run(ids, None, "auto", model=out)  # the checkpoint turns on the FP8 KV cache itself
    assert res.perplexity / base.perplexity - 1 < 0.08
    assert top1_agreement(res, base) > 0.85
