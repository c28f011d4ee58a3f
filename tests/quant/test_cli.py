"""`hopperllm quantize` and `hopperllm eval perplexity`: results, JSON output, and user errors (one line,
exit code 2)."""

from __future__ import annotations

import json
import os

import pytest

from hopperllm.entrypoints.cli import main
from tests.helpers import make_hf_llama_dir


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("cli") / "src"))


@pytest.fixture(scope="module")
def fp8_dir(src, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "fp8")
    assert main(["quantize", "--model", src, "--output", out, "--calib-tokens", "64"]) == 0
    return out


def _user_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_quantize_user_errors(src, fp8_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    _user_error(capsys, ["quantize", "--model", str(tmp_path / "nope"), "--output", out], "does not exist")
    _user_error(capsys, ["quantize", "--model", src, "--output", src], "not an empty directory")
    _user_error(
        capsys, ["quantize", "--model", src, "--output", out, "--calib-tokens", "0"], "--calib-tokens"
    )
    _user_error(
        capsys, ["quantize", "--model", src, "--output", out, "--calib-seq-len", "1"], "--calib-seq-len"
    )
    _user_error(capsys, ["quantize", "--model", fp8_dir, "--output", out], "already FP8")
    missing = str(tmp_path / "missing.txt")
    _user_error(
        capsys, ["quantize", "--model", src, "--output", out, "--calib-file", missing], "does not exist"
    )
    q = ["quantize", "--model", src, "--output", out]
    _user_error(capsys, [*q, "--algorithm", "awq"], "unknown algorithm 'awq': use one of rtn, gptq")
    _user_error(capsys, [*q, "--gptq-damp", "0.1"], "--gptq-damp apply to --algorithm gptq only")
    _user_error(capsys, [*q, "--algorithm", "gptq", "--gptq-damp", "-1"], "--gptq-damp must be >= 0")
    _user_error(capsys, [*q, "--ignore", "model.layers.9.*"], "'model.layers.9.*' matches no linear layer")
    _user_error(capsys, [*q, "--ignore", "model.layers.0.self_attn.q_proj"], "one fused layer")
    _user_error(capsys, [*q, "--keep-last-layers", "3"], "--keep-last-layers must be between 0 and 2")
    _user_error(capsys, [*q, "--keep-last-layers", "2"], "nothing to quantize")
    assert not os.path.exists(out)  # nothing half-written


def test_eval_user_errors(src, fp8_dir, tmp_path, capsys):
    ppl = ["eval", "perplexity", "--model", src]
    _user_error(capsys, [*ppl, "--context-len", "1"], "--context-len")
    _user_error(capsys, [*ppl, "--max-tokens", "1"], "--max-tokens")
    _user_error(capsys, [*ppl, "--context-len", "100000"], "max_model_len")
    _user_error(capsys, [*ppl, "--text-file", str(tmp_path / "none.txt")], "does not exist")
    _user_error(
        capsys, ["eval", "perplexity", "--model", fp8_dir, "-q", "fp8-activation-only"], "unquantized"
    )
    _user_error(capsys, ["eval", "perplexity", "--model", str(tmp_path / "nope")], "does not exist")


def test_eval_perplexity_with_reference_and_json(src, tmp_path, capsys):
    report_path = str(tmp_path / "r.json")
    argv = ["eval", "perplexity", "--model", src, "-q", "fp8", "--kv-cache-dtype", "fp8"]
    argv += ["--max-tokens", "300", "--context-len", "128", "--reference-model", "--output-json", report_path]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity ") and "top-1 agreement" in line
    with open(report_path) as f:
        report = json.load(f)
    assert report["num_tokens"] == 300 and report["context_len"] == 128
    assert report["eval"]["text"] == "pydoc_data.topics, held-out split"
    model, ref = report["model"], report["reference"]
    # 300 tokens = chunks of 128, 128, 44, each scoring all but its first token
    assert model["num_scored_tokens"] == ref["num_scored_tokens"] == 297
    assert model["quantization"] == "fp8" and model["kv_cache_dtype"] == "fp8"
    assert ref["quantization"] == "none" and ref["kv_cache_dtype"] == "auto"
    assert 0.5 < report["top1_agreement"] <= 1.0
    assert report["perplexity_delta"] == pytest.approx(model["perplexity"] / ref["perplexity"] - 1)
    assert 1.0 < ref["perplexity"] < float("inf")


def test_emulations_sit_between_baseline_and_fp8(src, tmp_path):
    def ppl(*extra) -> dict:
        path = str(tmp_path / "r.json")
        argv = ["eval", "perplexity", "--max-tokens", "400", "--context-len", "200"]
        assert main([*argv, *extra, "--output-json", path]) == 0
        with open(path) as f:
            return json.load(f)["model"]

    base = ppl("--model", src)
    weight_only = ppl("--model", src, "-q", "fp8-weight-only")
    act_only = ppl("--model", src, "-q", "fp8-activation-only")
    fp8 = ppl("--model", src, "-q", "fp8")
    assert weight_only["quantization"] == "fp8-weight-only"
    for emulated in (weight_only, act_only):
        assert emulated["perplexity"] != base["perplexity"] and emulated["perplexity"] != fp8["perplexity"]
        assert abs(emulated["perplexity"] / base["perplexity"] - 1) < 0.05

    # an FP8 checkpoint's weights, dequantized: round to nearest per channel, so the same weights as the
    # emulation's; and its FP8 KV cache turned off by a --kv-cache-dtype
    ckpt = str(tmp_path / "fp8")
    assert (
        main(["quantize", "--model", src, "--output", ckpt, "--dtype", "float32", "--calib-tokens", "64"])
        == 0
    )
    assert ppl("--model", ckpt, "-q", "fp8-weight-only")["perplexity"] == weight_only["perplexity"]
    assert ppl("--model", ckpt)["perplexity"] == fp8["perplexity"]
    kv_ckpt = str(tmp_path / "fp8-kv")
    argv = ["quantize", "--model", src, "--output", kv_ckpt, "--dtype", "float32", "--calib-tokens", "64"]
    assert main([*argv, "--kv-cache-dtype", "fp8"]) == 0
    assert ppl("--model", kv_ckpt)["kv_cache_dtype"] == "fp8"
    no_kv = ppl("--model", kv_ckpt, "--kv-cache-dtype", "float32")
    assert no_kv["kv_cache_dtype"] == "float32" and no_kv["perplexity"] == fp8["perplexity"]
