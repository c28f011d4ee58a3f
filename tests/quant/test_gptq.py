"""GPTQ for FP8 (hopperllm.quant.gptq): on a linear layer with correlated inputs it leaves less output
error than round to nearest, with the same scales and valid e4m3 codes; run layer by layer over a model it
takes each layer's Hessian from its real inputs; `hopperllm quantize --algorithm gptq` writes a checkpoint
that loads back with exactly those codes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hopperllm import LLM
from hopperllm.entrypoints.cli import main
from hopperllm.quant.fp8 import FP8_DTYPE, FP8_MAX, dequantize, quantize_weight, round_weight, weight_scales
from hopperllm.quant.gptq import GPTQConfig, gptq_quantize_model, gptq_quantize_weight
from tests.helpers import make_hf_llama_dir
from tests.quant.fp8_helpers import reference_logits, rel_err


def _correlated_inputs(seed: int, tokens: int, k: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated, as hidden states are (what makes error feedback pay
    off): a few latent directions, mixed by one fixed matrix, plus noise; `seed` draws the tokens."""
    mixing = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, k // 4, generator=g) @ mixing + 0.1 * torch.randn(tokens, k, generator=g)


def _output_err(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    return float((x @ w.T - x @ dequantize(codes, scale).T).norm())


def _check_codes(codes: torch.Tensor, shape) -> None:
    assert codes.dtype == FP8_DTYPE and codes.shape == shape
    values = codes.float()
    assert bool(torch.isfinite(values).all()) and float(values.abs().max()) <= FP8_MAX


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_gptq_has_less_output_error_than_round_to_nearest(act_order, per_channel):
    n, k = 48, 256
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.05
    sizes = [32, 16]  # two logical matrices, as in a merged layer
    x_calib, x_test = _correlated_inputs(2, 2048, k), _correlated_inputs(3, 512, k)
    scale = weight_scales(w, sizes, per_channel)
    rtn = round_weight(w, scale)
    # the scales and round to nearest are those of each logical matrix quantized on its own
    q0, s0 = quantize_weight(w[:32], per_channel)
    assert torch.equal(scale[:32], s0.expand(32)) and torch.equal(
        rtn[:32].view(torch.uint8), q0.view(torch.uint8)
    )
    # block 64 < k: the feedback between blocks is exercised too
    codes = gptq_quantize_weight(
        w, x_calib.T @ x_calib, scale, GPTQConfig(block_size=64, act_order=act_order)
    )
    _check_codes(codes, (n, k))
    for x in (x_calib, x_test):  # on the calibration inputs and on fresh ones from the same distribution
        gptq_err, rtn_err = _output_err(x, w, codes, scale), _output_err(x, w, rtn, scale)
        assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Hessian couples no columns: nothing to feed back, so the codes are round to nearest's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g)
    w[:, 5] = 0.0  # and a zero column, and a column never seen in calibration (H_jj = 0)
    h = torch.diag(torch.rand(96, generator=g) + 0.1)
    h[7, 7] = 0.0
    scale = weight_scales(w, [40])
    for cfg in (GPTQConfig(), GPTQConfig(act_order=True, block_size=16)):
        codes = gptq_quantize_weight(w, h, scale, cfg)
        assert torch.equal(codes.view(torch.uint8), round_weight(w, scale).view(torch.uint8))


def test_gptq_user_errors():
    w, scale = torch.randn(8, 16), torch.ones(8)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(w, torch.eye(8), scale)
    with pytest.raises(ValueError, match="--gptq-damp"):  # singular, and no dampening to fix it
        gptq_quantize_weight(w, torch.ones(16, 16), scale, GPTQConfig(damp=0.0))
    with pytest.raises(ValueError, match="--gptq-damp"):
        GPTQConfig(damp=-0.1)
    with pytest.raises(ValueError, match="--gptq-block-size"):
        GPTQConfig(block_size=0)


# -- a whole model, layer by layer -----------------------------------------------------------------------
CALIB = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(5)).tolist()
IDS = torch.randint(3, 300, (96,), generator=torch.Generator().manual_seed(6)).tolist()
CHUNKS = [CALIB[:128], CALIB[128:]]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("gptq") / "src"))


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw)


def _runner(llm: LLM):
    return llm.engine.executor.runner


def test_model_layer_by_layer_hessians_are_each_layers_inputs(src):
    """The first layer's Hessians are those of the unquantized model's inputs; a later layer's come from
    the quantized layers before it (so they differ from the unquantized model's)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    llm = _llm(src)
    model = _runner(llm).model
    watched = {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"}
    handles = []
    for name, m in model.named_modules():
        if name in watched:
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, a, n=name: inputs.setdefault(n, []).append(a[0].clone())
                )
            )
    for chunk in CHUNKS:
        _runner(llm).logits_for_tokens(chunk)
    for h in handles:
        h.remove()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in watched}

    codes = gptq_quantize_model(model, _runner(llm).logits_for_tokens, CHUNKS, show_progress=False)
    assert len(codes) == 8  # 4 linear layers x 2 decoder layers
    for name in watched:
        h = torch.zeros(weights[name].shape[1], weights[name].shape[1])
        for x in inputs[name]:  # the same accumulation as the hooks, chunk by chunk
            h.addmm_(x.float().T, x.float())
        scale = weight_scales(weights[name], [weights[name].shape[0]])
        expect = gptq_quantize_weight(weights[name], h, scale)
        q, s = codes[name]
        assert torch.equal(s, scale)
        _check_codes(q, weights[name].shape)
        same = torch.equal(q.view(torch.uint8), expect.view(torch.uint8))
        assert same == (name == "model.layers.0.self_attn.qkv_proj"), name
    # the model is left with its dequantized FP8 weights
    q, s = codes["model.layers.1.mlp.down_proj"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dequantize(q, s))


def test_quantize_gptq_checkpoint_loads_back_with_its_codes(src, tmp_path, capsys):
    def quantize(name: str, *extra: str) -> str:
        out = str(tmp_path / name)
        argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--dtype", "float32"]
        assert main([*argv, "--calib-tokens", "200", "--calib-seq-len", "128", *extra]) == 0
        return out

    gptq = quantize("gptq", "--algorithm", "gptq", "--gptq-block-size", "32")
    assert "rounded by gptq" in capsys.readouterr().out
    rtn = quantize("rtn")
    with open(os.path.join(gptq, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(rtn, "config.json")) as f:
        assert json.load(f)["quantization_config"] == qc  # the same format: only the codes differ
    ckpt, rtn_ckpt = (
        load_file(os.path.join(gptq, "model.safetensors")),
        load_file(os.path.join(rtn, "model.safetensors")),
    )
    assert ckpt.keys() == rtn_ckpt.keys()
    changed = 0
    for name, t in ckpt.items():
        assert t.dtype == rtn_ckpt[name].dtype and t.shape == rtn_ckpt[name].shape
        if name.endswith(".weight") and t.dtype == FP8_DTYPE:
            _check_codes(t, t.shape)
            changed += not torch.equal(t.view(torch.uint8), rtn_ckpt[name].view(torch.uint8))
        else:  # scales (weight, KV cache) and unquantized tensors are round to nearest's
            assert torch.equal(t, rtn_ckpt[name]), name
    assert changed == 14  # every projection of both layers

    llm = _llm(gptq)
    assert llm.engine.config.cache_config.kv_cache_dtype == "fp8"
    attn = _runner(llm).model.model.layers[1].self_attn
    qkv = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight.view(torch.uint8), qkv.view(torch.uint8))
    assert torch.equal(attn.o_proj.weight_scale, ckpt["model.layers.1.self_attn.o_proj.weight_scale"])
    # logits: those of the dequantized reference (KV cache in float32, so that only the linears count).
    # Whether they are closer to the unquantized model's than round to nearest's is for a real model with
    # real text to say (tests/quant/test_accuracy.py): this one is random, calibrated on 200 random tokens.
    ours = _runner(_llm(gptq, kv_cache_dtype="float32")).logits_for_tokens(IDS)
    assert rel_err(ours, reference_logits(src, ckpt, IDS)) < 1e-4
