"""FP8 KV cache on the CPU (the torch backend, and the Triton backend in Triton's interpreter): it stores
x / scale with the layer's scales (from the checkpoint, calibrated by `hopperllm quantize`, or 1.0), stays
close to a float32 cache, and serves greedy decoding and prefix-cache hits."""

from __future__ import annotations

import os

import pytest
import torch

from hopperllm import LLM, SamplingParams
from hopperllm.entrypoints.cli import main
from hopperllm.loader.dummy_tokenizer import byte_tokenizer
from hopperllm.quant.calibrate import eval_text
from tests.helpers import make_hf_llama_dir
from tests.quant.fp8_helpers import rel_err

# text like the calibration text (byte tokens), so that calibrated ranges apply
IDS = byte_tokenizer().encode(eval_text(), add_special_tokens=False)[:80]
# e4m3 keeps 3 mantissa bits (~3% rounding per K/V element); the tiny random model's peaky attention turns
# that into ~7% relative logit error, from either unit or calibrated scales (the SmolLM2 perplexity test
# in test_accuracy.py measures the effect on a real model)
KV_TOL = 0.15


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kv")
    src = make_hf_llama_dir(str(base / "src"))
    out = str(base / "fp8kv")
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--dtype", "float32"]
    assert main([*argv, "--calib-tokens", "256", "--calib-seq-len", "128"]) == 0
    return src, out


def _llm(path, **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw)


def _runner(llm):
    return llm.engine.executor.runner


def test_fp8_cache_with_unit_scales_is_close_to_float32(dirs):
    src, _ = dirs
    fp8 = _llm(src, kv_cache_dtype="fp8")
    assert _runner(fp8).kv_caches[0].dtype == torch.float8_e4m3fn
    assert float(_runner(fp8).model.model.layers[0].self_attn.attn.k_scale) == 1.0
    ref = _runner(_llm(src)).logits_for_tokens(IDS)
    err = rel_err(_runner(fp8).logits_for_tokens(IDS), ref)
    assert 0 < err < KV_TOL, err


def test_calibrated_scales_fill_the_fp8_range_and_stay_close(dirs):
    _, out = dirs
    llm = _llm(out)  # the checkpoint says kv_cache_quant_algo FP8: the cache is FP8 without a flag
    runner = _runner(llm)
    assert runner.kv_dtype == torch.float8_e4m3fn
    logits = runner.logits_for_tokens(IDS)
    attn = runner.model.model.layers[0].self_attn.attn
    assert float(attn.k_scale) != 1.0 and float(attn.v_scale) != 1.0
    # the stored codes are K / k_scale: calibrated on similar text, their maximum lands near 448
    k_codes = runner.kv_caches[0][0].reshape(-1, attn.num_kv_heads, attn.head_dim)[: len(IDS)].float()
    v_codes = runner.kv_caches[0][1].reshape(-1, attn.num_kv_heads, attn.head_dim)[: len(IDS)].float()
    assert 100 < float(k_codes.abs().max()) <= 448 and 100 < float(v_codes.abs().max()) <= 448
    # the same checkpoint with a float32 cache: only the KV cache differs
    ref = _runner(_llm(out, kv_cache_dtype="float32")).logits_for_tokens(IDS)
    assert 0 < rel_err(logits, ref) < KV_TOL


def test_scales_are_applied_when_reading_the_cache(dirs):
    """Doubling a layer's scales halves the stored codes but must not change the attention result much."""
    _, out = dirs
    llm = _llm(out)
    ref = _runner(llm).logits_for_tokens(IDS)
    for layer in _runner(llm).model.model.layers:
        layer.self_attn.attn.k_scale.data *= 2
        layer.self_attn.attn.v_scale.data *= 2
    assert rel_err(_runner(llm).logits_for_tokens(IDS), ref) < KV_TOL


def test_greedy_decoding_and_prefix_cache_hits_with_fp8_kv(dirs):
    _, out = dirs
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": IDS[:40]}  # two full blocks of 16 can be reused
    llm = LLM(model=out, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    second = llm.generate(prompt, params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    no_cache = LLM(
        model=out,
        dtype="float32",
        device="cpu",
        num_kv_blocks=64,
        show_progress=False,
        enable_prefix_caching=False,
    )
    assert (
        no_cache.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        == first.outputs[0].token_ids
    )
    assert len(first.outputs[0].token_ids) == 12


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton backend on CPU tensors needs Triton's interpreter",
)
def test_triton_backend_uses_the_same_fp8_scales(dirs):
    """The Triton backend (fused rotary + FP8 cache write, prefill and flash-decoding kernels) applies the
    checkpoint's k/v scales exactly like the torch backend: same logits, same greedy tokens."""
    from hopperllm.layers.attention import get_attention_backend

    _, out = dirs
    torch_llm, triton_llm = _llm(out), _llm(out)
    for attn in _runner(triton_llm).model.attention_layers():
        attn.backend = get_attention_backend("triton")
    ids = IDS[:48]
    ref = _runner(torch_llm).logits_for_tokens(ids)
    assert rel_err(_runner(triton_llm).logits_for_tokens(ids), ref) < 1e-5
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": ids[:20]}
    expect = torch_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert triton_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expect
