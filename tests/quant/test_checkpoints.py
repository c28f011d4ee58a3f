"""FP8 checkpoints: what `hopperllm quantize` writes (ModelOpt format) loads back bit for bit, and
hand-made compressed-tensors / `fp8`-method / ModelOpt checkpoints give the logits of an independent
dequantized reference (transformers + the same activation quantization)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hopperllm import LLM
from hopperllm.entrypoints.cli import main
from hopperllm.loader.fp8_checkpoints import checkpoint_fp8_format, checkpoint_module_names, kv_cache_is_fp8
from hopperllm.quant.fp8 import FP8_DTYPE, quantize_weight
from tests.helpers import hf_logits, make_hf_llama_dir
from tests.quant.fp8_helpers import make_fp8_checkpoint, reference_logits, rel_err

IDS = torch.randint(3, 300, (96,), generator=torch.Generator().manual_seed(3)).tolist()
CALIB_IDS = torch.randint(3, 300, (128,), generator=torch.Generator().manual_seed(4)).tolist()
# FP8 execution and the transformers reference take the same e4m3 codes (static scales: bit-identical logits;
# per-token: ~3e-7 from float32 rounding); quantization itself moves the logits ~0.1.
MATCH_TOL = 1e-4


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("fp8") / "src"))


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw)


def _logits(llm: LLM, ids=IDS) -> torch.Tensor:
    return llm.engine.executor.runner.logits_for_tokens(ids)


def _layer_params(llm: LLM, layer: int = 0):
    m = llm.engine.executor.runner.model.model.layers[layer]
    return m.self_attn, m.mlp


# -- hopperllm quantize -> ModelOpt checkpoint ----------------------------------------------------
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_writes_modelopt_checkpoint_that_loads_back_identically(src, tmp_path, per_channel, capsys):
    out = str(tmp_path / "out")
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--static-activations"]
    argv += ["--calib-tokens", "300", "--calib-seq-len", "128", "--dtype", "float32"]
    argv += [] if per_channel else ["--per-tensor"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out

    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert qc["kv_cache_quant_algo"] == "FP8" and checkpoint_fp8_format(qc) == "modelopt"
    with open(os.path.join(out, "hf_quant_config.json")) as f:
        hqc = json.load(f)
    assert hqc["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head"],
    }
    ckpt = load_file(os.path.join(out, "model.safetensors"))
    p = "model.layers.0.self_attn"
    assert ckpt[f"{p}.q_proj.weight"].dtype == FP8_DTYPE
    assert ckpt[f"{p}.q_proj.weight_scale"].shape == ((64,) if per_channel else ())
    assert ckpt[f"{p}.q_proj.input_scale"].shape == () and ckpt[f"{p}.k_proj.k_scale"].shape == ()
    # the weights are the source's, quantized
    srcw = load_file(os.path.join(src, "model.safetensors"))
    q, s = quantize_weight(srcw[f"{p}.v_proj.weight"], per_channel)
    assert torch.equal(ckpt[f"{p}.v_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ckpt[f"{p}.v_proj.weight_scale"].reshape(-1), s)

    llm = _llm(out)
    assert llm.engine.config.cache_config.kv_cache_dtype == "fp8"  # detected from the checkpoint
    for layer in range(2):
        attn, mlp = _layer_params(llm, layer)
        p = f"model.layers.{layer}"
        for ours, pieces in (
            (attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
            (mlp.gate_up_proj, ("gate_proj", "up_proj")),
        ):
            part = "self_attn" if "q_proj" in pieces else "mlp"
            w = torch.cat([ckpt[f"{p}.{part}.{x}.weight"] for x in pieces])
            scales = torch.cat(
                [
                    ckpt[f"{p}.{part}.{x}.weight_scale"]
                    .reshape(-1)
                    .expand(ckpt[f"{p}.{part}.{x}.weight"].shape[0])
                    for x in pieces
                ]
            )
            assert torch.equal(ours.weight.view(torch.uint8), w.view(torch.uint8))
            assert torch.equal(ours.weight_scale, scales)
            in_scale = max(float(ckpt[f"{p}.{part}.{x}.input_scale"]) for x in pieces)
            assert float(ours.input_scale) == in_scale
        for ours, name in ((attn.o_proj, "self_attn.o_proj"), (mlp.down_proj, "mlp.down_proj")):
            assert torch.equal(ours.weight.view(torch.uint8), ckpt[f"{p}.{name}.weight"].view(torch.uint8))
            assert torch.equal(ours.weight_scale, ckpt[f"{p}.{name}.weight_scale"].reshape(-1).expand(64))
            assert float(ours.input_scale) == float(ckpt[f"{p}.{name}.input_scale"])
        assert float(attn.attn.k_scale) == float(ckpt[f"{p}.self_attn.k_proj.k_scale"])
        assert float(attn.attn.v_scale) == float(ckpt[f"{p}.self_attn.v_proj.v_scale"])

    # logits: the dequantized reference (activations quantized with the checkpoint's static scales), with
    # the KV cache in float32 so that only the linear layers are compared
    ours = _logits(_llm(out, kv_cache_dtype="float32"))
    ref = reference_logits(src, ckpt, IDS)
    assert rel_err(ours, ref) < MATCH_TOL
    assert rel_err(ours, hf_logits(src, IDS)) < 0.25  # and not far from the unquantized model


def test_quantize_shards_large_checkpoints(src, tmp_path):
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    common = ["--model", src, "--calib-tokens", "64", "--calib-seq-len", "64", "--dtype", "float32"]
    assert main(["quantize", *common, "--output", one]) == 0
    assert main(["quantize", *common, "--output", many, "--max-shard-size", str(40_000 / 2**30)]) == 0
    shards = sorted(f for f in os.listdir(many) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(many, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(load_file(os.path.join(one, "model.safetensors")))
    with open(os.path.join(one, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert torch.equal(_logits(_llm(one)), _logits(_llm(many)))


def test_quantize_a_dummy_model_writes_its_tokenizer(tmp_path):
    out = str(tmp_path / "tiny")
    assert main(["quantize", "--model", "dummy:tiny", "--output", out, "--calib-tokens", "64"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    llm = LLM(model=out, device="cpu", num_kv_blocks=32, show_progress=False)
    tok = llm.get_tokenizer()
    assert tok.decode(tok.encode("héllo", add_special_tokens=False)) == "héllo"
    assert tok.chat_template is not None and tok.bos_token == "<s>"


# -- hand-made checkpoints in each format -----------------------------------------------------------
FORMAT_CASES = [
    ("compressed-tensors", False, True),  # tensor strategy, static activations
    ("compressed-tensors", True, False),  # channel strategy, dynamic (per-token) activations
    ("compressed-tensors", True, True),
    ("fp8", False, True),  # AutoFP8 / vLLM `fp8` method, static
    ("fp8", False, False),
    ("modelopt", False, True),
    ("modelopt", True, False),  # FP8_PER_CHANNEL_PER_TOKEN
]


@pytest.mark.parametrize(("fmt", "per_channel", "static"), FORMAT_CASES)
def test_hand_made_checkpoint_matches_dequantized_reference(src, tmp_path, fmt, per_channel, static):
    dst = str(tmp_path / fmt)
    ckpt = make_fp8_checkpoint(src, dst, fmt, per_channel, static, CALIB_IDS)
    llm = _llm(dst)
    attn, mlp = _layer_params(llm)
    assert attn.qkv_proj.weight.dtype == FP8_DTYPE
    assert (attn.qkv_proj.input_scale is not None) == static
    ours = _logits(llm)
    ref = reference_logits(src, ckpt, IDS)
    assert rel_err(ours, ref) < MATCH_TOL, rel_err(ours, ref)
    # the checkpoint's own quantization moves the logits far more than the tolerance
    assert rel_err(ref, hf_logits(src, IDS)) > 3 * MATCH_TOL


def test_dynamic_scheme_ignores_stray_input_scales(src, tmp_path):
    """`activation_scheme: dynamic` means per-token scales even when the file also holds input_scale."""
    dst = str(tmp_path / "fp8")
    make_fp8_checkpoint(src, dst, "fp8", False, True, CALIB_IDS)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["activation_scheme"] = "dynamic"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    attn, _ = _layer_params(_llm(dst))
    assert attn.qkv_proj.input_scale is None


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8", "modelopt"])
def test_kv_cache_scales_load_under_each_formats_names(src, tmp_path, fmt):
    dst = str(tmp_path / fmt)
    make_fp8_checkpoint(src, dst, fmt, True, False, CALIB_IDS, kv_scales={0: (0.02, 0.003), 1: (0.05, 0.004)})
    # compressed-tensors and ModelOpt say FP8 KV in their config; the fp8 method needs the flag
    llm = _llm(dst, kv_cache_dtype="fp8" if fmt == "fp8" else "auto")
    assert llm.engine.config.cache_config.kv_cache_dtype == "fp8"
    for layer, (ks, vs) in {0: (0.02, 0.003), 1: (0.05, 0.004)}.items():
        attn, _ = _layer_params(llm, layer)
        assert float(attn.attn.k_scale) == pytest.approx(ks) and float(attn.attn.v_scale) == pytest.approx(vs)


def test_quantization_config_detection():
    assert kv_cache_is_fp8({"quant_method": "modelopt", "quantization": {"kv_cache_quant_algo": "FP8"}})
    assert kv_cache_is_fp8({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_scheme": "FP8"})
    assert kv_cache_is_fp8({"kv_cache_scheme": {"type": "float", "num_bits": 8}})
    assert not kv_cache_is_fp8({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None})
    assert (
        checkpoint_fp8_format({"quant_method": "modelopt", "quantization": {"quant_algo": "FP8"}})
        == "modelopt"
    )
    with pytest.raises(ValueError, match="NVFP4"):
        checkpoint_fp8_format({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    with pytest.raises(ValueError, match="block"):
        checkpoint_fp8_format({"quant_method": "fp8", "weight_block_size": [128, 128]})


# -- on-the-fly quantization -----------------------------------------------------------------------
def test_on_the_fly_fp8_from_fp32_weights(src):
    llm = _llm(src, quantization="fp8")
    attn, _ = _layer_params(llm)
    srcw = load_file(os.path.join(src, "model.safetensors"))
    q_w = srcw["model.layers.0.self_attn.q_proj.weight"]
    q, s = quantize_weight(q_w, per_channel=True)
    assert torch.equal(attn.qkv_proj.weight[:64].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(attn.qkv_proj.weight_scale[:64], s)
    assert attn.qkv_proj.input_scale is None  # dynamic per-token activations
    # same as a per-channel, dynamic checkpoint of the same weights
    ckpt = {}
    for name, t in srcw.items():
        if name.endswith("_proj.weight"):
            ckpt[name], ckpt[name[: -len("weight")] + "weight_scale"] = quantize_weight(t, per_channel=True)
    assert rel_err(_logits(llm), reference_logits(src, ckpt, IDS)) < MATCH_TOL


def test_modelopt_export_with_only_hf_quant_config_loads(src, tmp_path):
    """Older ModelOpt exports carry no quantization_config in config.json, only hf_quant_config.json."""
    out = str(tmp_path / "out")
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--static-activations"]
    assert main(argv + ["--calib-tokens", "200", "--calib-seq-len", "100", "--dtype", "float32"]) == 0
    ref = _logits(_llm(out))
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    del cfg["quantization_config"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    llm = _llm(out)
    assert llm.engine.config.cache_config.kv_cache_dtype == "fp8"
    assert torch.equal(_logits(llm), ref)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_ignored_layers_stay_unquantized(src, tmp_path, fmt):
    """A layer on the checkpoint's ignore list is stored in high precision and must be run that way."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / fmt)
    make_fp8_checkpoint(src, out, fmt, per_channel=True, static=False, calib_ids=CALIB_IDS)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    srcw = load_file(os.path.join(src, "model.safetensors"))
    ignored = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    for m in ignored:
        tensors[m + ".weight"] = srcw[m + ".weight"]
        tensors.pop(m + ".weight_scale", None)
        tensors.pop(m + ".input_scale", None)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    key = "ignore" if fmt == "compressed-tensors" else "exclude_modules"
    if fmt == "compressed-tensors":  # exact names or re: regexes
        pats = ["lm_head", "re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj"]
    else:  # ModelOpt: shell wildcards
        pats = ["lm_head", "model.layers.1.mlp.gate_proj", "*.layers.1.mlp.up_proj"]
    cfg["quantization_config"][key] = pats
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    llm = _llm(out)
    layers = llm.engine.executor.runner.model.model.layers
    gate_up = layers[1].mlp.gate_up_proj
    assert gate_up.quantization is None and gate_up.weight.dtype == torch.float32
    assert torch.equal(
        gate_up.weight[: gate_up.weight.shape[0] // 2], srcw["model.layers.1.mlp.gate_proj.weight"]
    )
    assert layers[1].mlp.down_proj.weight.dtype == FP8_DTYPE  # not ignored
    assert layers[0].mlp.gate_up_proj.weight.dtype == FP8_DTYPE
    assert torch.isfinite(_logits(llm)).all()

    # only one of a fused pair ignored: a clear error
    cfg["quantization_config"][key] = ["model.layers.1.mlp.gate_proj"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="fused layer"):
        _llm(out)


LAYER_MODULES = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        (
            ["--keep-last-layers", "1", "--algorithm", "gptq"],
            [f"model.layers.1.{m}" for m in LAYER_MODULES],
        ),
        (  # wildcards and regexes, as llm-compressor's ignore and ModelOpt's exclude_modules take them
            ["--ignore", "model.layers.0.mlp.*", r"re:model\.layers\.1\.self_attn\.[qkv]_proj", "lm_head"],
            [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
            + [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"],
        ),
    ],
)
def test_quantize_keeps_ignored_layers_unquantized(src, tmp_path, flags, kept, capsys):
    out = str(tmp_path / "out")
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--static-activations"]
    assert main([*argv, "--calib-tokens", "200", "--calib-seq-len", "100", "--dtype", "float32", *flags]) == 0
    assert f"{len(kept)} linear modules kept unquantized" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(out, "hf_quant_config.json")) as f:
        hqc = json.load(f)["quantization"]
    # by exact names, which every loader's matcher (exact, wildcard, regex) takes as they are
    assert qc["exclude_modules"] == qc["ignore"] == hqc["exclude_modules"] == ["lm_head", *kept]
    ckpt = load_file(os.path.join(out, "model.safetensors"))
    srcw = load_file(os.path.join(src, "model.safetensors"))
    for layer in range(2):
        for m in LAYER_MODULES:
            name = f"model.layers.{layer}.{m}"
            if name in kept:
                assert torch.equal(ckpt[name + ".weight"], srcw[name + ".weight"])
                assert name + ".weight_scale" not in ckpt and name + ".input_scale" not in ckpt
            else:
                assert ckpt[name + ".weight"].dtype == FP8_DTYPE and name + ".input_scale" in ckpt
    assert "model.layers.1.self_attn.k_proj.k_scale" in ckpt  # the KV cache is FP8 in every layer

    llm = _llm(out)
    for name, module in llm.engine.executor.runner.model.named_modules():
        if name.endswith("_proj") and name.startswith("model.layers."):
            is_kept = checkpoint_module_names(name)[0] in kept
            assert (module.quantization is None) == is_kept, name
            assert module.weight.dtype == (torch.float32 if is_kept else FP8_DTYPE)
    ours = _logits(_llm(out, kv_cache_dtype="float32"))
    assert rel_err(ours, reference_logits(src, ckpt, IDS)) < MATCH_TOL
