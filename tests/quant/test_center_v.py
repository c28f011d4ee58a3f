"""`--center-v` (hopperllm.quant.center): moving V's calibration mean into v_proj's and o_proj's biases
leaves an unquantized model's logits as they were (GQA included) while the V cache stores centered values;
`hopperllm quantize --center-v` writes a checkpoint with `attention_bias: true` that loads back into
hopperllm and into transformers, whose dequantized logits it matches; an FP8 model is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hopperllm import LLM
from hopperllm.entrypoints.cli import main
from hopperllm.quant.calibrate import calibrate, calibration_text, chunk_tokens
from hopperllm.quant.center import center_v_cache_, v_means
from hopperllm.quant.fp8 import FP8_DTYPE, dequantize, scale_from_amax
from tests.helpers import hf_logits, make_hf_llama_dir
from tests.quant.fp8_helpers import reference_logits, rel_err

IDS = torch.randint(3, 300, (96,), generator=torch.Generator().manual_seed(3)).tolist()
CALIB_IDS = torch.randint(3, 300, (128,), generator=torch.Generator().manual_seed(4)).tolist()
# the same function computed in another float32 order (the biases' sums): logits of magnitude ~1-10
EXACT_TOL = 1e-5
MATCH_TOL = 1e-4  # as tests/quant/test_checkpoints.py: FP8 execution vs the dequantized reference
LAYERS = 2


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    # make_hf_llama_dir's default is GQA: 4 query heads on 2 KV heads, so o_proj's bias repeats each mean
    path = make_hf_llama_dir(str(tmp_path_factory.mktemp("center") / "src"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    return path


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw)


def _runner(llm: LLM):
    return llm.engine.executor.runner


def _attn(llm: LLM, layer: int):
    return _runner(llm).model.model.layers[layer].self_attn


def _cached_v(llm: LLM, layer: int, n: int) -> torch.Tensor:
    """V [n, Hkv, D] in layer `layer`'s cache after logits_for_tokens of n tokens (blocks 0.., so slots 0..n-1)."""
    cache = _runner(llm).kv_caches[layer]
    _, nb, bs, hkv, d = cache.shape
    assert cache.dtype == torch.float32
    return cache[1].reshape(nb * bs, hkv, d)[:n]


def _attn_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


def test_centering_is_exact_and_the_cache_stores_centered_v(src):
    llm = _llm(src)
    runner = _runner(llm)
    ref = runner.logits_for_tokens(IDS)
    means = v_means(runner.model, runner.logits_for_tokens, [CALIB_IDS])
    assert set(means) == {_attn_name(i) for i in range(LAYERS)}
    # the observer's mean is the mean of what the cache holds for those tokens
    runner.logits_for_tokens(CALIB_IDS)
    before = [_cached_v(llm, i, len(CALIB_IDS)).double().mean(0) for i in range(LAYERS)]
    for i in range(LAYERS):
        torch.testing.assert_close(means[_attn_name(i)], before[i], atol=1e-7, rtol=1e-6)

    assert center_v_cache_(runner.model, means) == LAYERS
    assert runner.model.config.attention_bias
    for i in range(LAYERS):
        attn = _attn(llm, i)
        bias = attn.qkv_proj.bias
        assert bias.dtype == torch.float32 and not bias.is_inference()
        assert not bias[: attn.q_size + attn.kv_size].any()  # q and k untouched
        torch.testing.assert_close(
            bias[attn.q_size + attn.kv_size :].double(), -means[_attn_name(i)].reshape(-1)
        )
        m_q = means[_attn_name(i)].repeat_interleave(2, dim=0).reshape(-1)  # 4 query heads on 2 KV heads
        torch.testing.assert_close(attn.o_proj.bias.double(), attn.o_proj.weight.double() @ m_q)

    # the same function: logits within float32 rounding
    torch.testing.assert_close(runner.logits_for_tokens(IDS), ref, atol=EXACT_TOL, rtol=EXACT_TOL)
    # and the cache now holds centered V: each channel's mean over the calibration tokens is ~0
    runner.logits_for_tokens(CALIB_IDS)
    for i in range(LAYERS):
        after = _cached_v(llm, i, len(CALIB_IDS)).double().mean(0)
        assert float(after.abs().max()) < 1e-6 < 1e-3 * float(before[i].abs().max())


def test_centering_by_any_vector_is_exact(src):
    """The identity holds for every m, not only the mean: random m per KV head as large as V itself (std
    ~0.65 here) make a wrong head mapping in o_proj's bias (query head h reads KV head h // group) show in
    the logits. float32 rounding grows with m (v - m + m): ~2e-6 relative at this size."""
    llm = _llm(src)
    runner = _runner(llm)
    ref = runner.logits_for_tokens(IDS)
    g = torch.Generator().manual_seed(5)
    means = {_attn_name(i): torch.randn(2, 16, generator=g, dtype=torch.float64) for i in range(LAYERS)}
    center_v_cache_(runner.model, means)
    assert rel_err(runner.logits_for_tokens(IDS), ref) < EXACT_TOL
    # the same vectors with the heads' order reversed are not a valid centering: the test can tell
    llm2 = _llm(src)
    model2 = _runner(llm2).model
    center_v_cache_(model2, means)
    for i in range(LAYERS):
        o = model2.model.layers[i].self_attn.o_proj
        wrong = means[_attn_name(i)].repeat(2, 1).reshape(-1)  # head h -> KV head h % 2
        o.bias.data.copy_((o.weight.double() @ wrong).float())
    assert rel_err(_runner(llm2).logits_for_tokens(IDS), ref) > 100 * EXACT_TOL


def _hf_dir_of(ckpt: dict[str, torch.Tensor], out: str, dst: str) -> str:
    """The checkpoint as a plain float32 transformers directory: its config.json without the quantization
    config, each FP8 projection weight dequantized, everything else (biases included) as stored."""
    tensors = {}
    for name, t in ckpt.items():
        if name.endswith((".weight_scale", ".input_scale", ".k_scale", ".v_scale")):
            continue
        module = name.removesuffix(".weight")
        if t.dtype == FP8_DTYPE:
            t = dequantize(t, ckpt[module + ".weight_scale"].reshape(-1))
        tensors[name] = t.float().contiguous()
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    del cfg["quantization_config"]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_quantize_center_v_writes_biases_that_load_in_hopperllm_and_transformers(src, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--static-activations"]
    argv += ["--center-v", "--calib-tokens", "300", "--calib-seq-len", "128", "--dtype", "float32"]
    assert main(argv) == 0
    assert f"V cache centered in {LAYERS} layers" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["attention_bias"] is True and cfg["quantization_config"]["kv_cache_quant_algo"] == "FP8"
    ckpt = load_file(os.path.join(out, "model.safetensors"))

    # the reference: the same calibration chunks through the unquantized source, centered here
    llm = _llm(src)
    runner = _runner(llm)
    ids = llm.get_tokenizer().encode(calibration_text(), add_special_tokens=False)[:300]
    chunks = chunk_tokens(ids, 128, min_len=1)
    means = v_means(runner.model, runner.logits_for_tokens, chunks)
    srcw = load_file(os.path.join(src, "model.safetensors"))
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn"
        m = means[_attn_name(i)]
        assert not ckpt[f"{p}.q_proj.bias"].any() and not ckpt[f"{p}.k_proj.bias"].any()
        torch.testing.assert_close(ckpt[f"{p}.v_proj.bias"].double(), -m.reshape(-1), atol=1e-6, rtol=0)
        w_o = srcw[f"{p}.o_proj.weight"].double()
        torch.testing.assert_close(
            ckpt[f"{p}.o_proj.bias"].double(), w_o @ m.repeat_interleave(2, 0).reshape(-1), atol=1e-5, rtol=0
        )
    # the ranges were taken after centering: V's and o_proj's input scales are the centered model's
    center_v_cache_(runner.model, means)
    stats = calibrate(runner.model, runner.logits_for_tokens, chunks)
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn"
        assert torch.equal(ckpt[f"{p}.v_proj.v_scale"], scale_from_amax(stats.v_amax[_attn_name(i)]))
        assert torch.equal(ckpt[f"{p}.o_proj.input_scale"], scale_from_amax(stats.input_amax[f"{p}.o_proj"]))

    # hopperllm loads it, biases included, with its FP8 KV cache
    fp8 = _llm(out)
    assert fp8.engine.config.cache_config.kv_cache_dtype == "fp8"
    for i in range(LAYERS):
        attn, p = _attn(fp8, i), f"model.layers.{i}.self_attn"
        assert attn.qkv_proj.weight.dtype == FP8_DTYPE
        qkv_bias = torch.cat([ckpt[f"{p}.{x}_proj.bias"] for x in "qkv"])
        assert torch.equal(attn.qkv_proj.bias, qkv_bias) and torch.equal(
            attn.o_proj.bias, ckpt[f"{p}.o_proj.bias"]
        )
    assert torch.isfinite(_runner(fp8).logits_for_tokens(IDS)).all()

    # transformers' Llama with attention_bias loads the dequantized checkpoint; with the same activation
    # quantization it gives hopperllm's logits (KV cache in float32, as the reference has)
    hf_dir = _hf_dir_of(ckpt, out, str(tmp_path / "hf"))
    ours = _runner(_llm(out, kv_cache_dtype="float32")).logits_for_tokens(IDS)
    ref = reference_logits(hf_dir, ckpt, IDS)
    assert rel_err(ours, ref) < MATCH_TOL, rel_err(ours, ref)
    assert rel_err(ours, hf_logits(src, IDS)) < 0.25  # and not far from the unquantized source


def test_centering_refuses_fp8_and_incomplete_means(src):
    fp8 = _runner(_llm(src, quantization="fp8")).model
    means = {_attn_name(i): torch.zeros(2, 16, dtype=torch.float64) for i in range(LAYERS)}
    with pytest.raises(ValueError, match="centered before quantizing.*already FP8"):
        center_v_cache_(fp8, means)

    model = _runner(_llm(src)).model
    with pytest.raises(ValueError, match="no V mean for it"):
        center_v_cache_(model, {_attn_name(0): means[_attn_name(0)]})
    with pytest.raises(ValueError, match=r"shape \(16,\), expected \(2, 16\)"):
        center_v_cache_(model, {**means, _attn_name(1): torch.zeros(16)})
    # every layer is checked before any is changed
    assert all(layer.self_attn.qkv_proj.bias is None for layer in model.model.layers)
    assert not model.config.attention_bias
