"""Quantization-aware distillation (hopperllm.quant.distill, `hopperllm quantize --distill-tokens`): the
student's FP8 pipeline computes the engine's logits for the checkpoint before training; distillation
lowers its validation KL to the unquantized model, changes only the norm gains and weight scales, and the
checkpoint it rewrites loads back with those; bad flag combinations are clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hopperllm import LLM
from hopperllm.entrypoints.cli import main
from hopperllm.quant.calibrate import chunk_tokens
from hopperllm.quant.distill import (
    DistillConfig,
    FP8Student,
    distill,
    load_checkpoint_tensors,
    teacher_log_probs,
)
from tests.helpers import make_hf_llama_dir

IDS = torch.randint(3, 300, (256,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("distill") / "src"), seed=3)


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=64, show_progress=False, **kw)


def _quantize(src: str, out: str, *extra: str) -> str:
    argv = ["quantize", "--model", src, "--output", out, "--kv-cache-dtype", "fp8", "--dtype", "float32"]
    assert main([*argv, "--calib-tokens", "256", "--calib-seq-len", "64", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def plain(src, tmp_path_factory) -> str:
    return _quantize(src, str(tmp_path_factory.mktemp("distill") / "plain"))


def _student(ckpt: str) -> FP8Student:
    with open(os.path.join(ckpt, "config.json")) as f:
        return FP8Student(json.load(f), load_checkpoint_tensors(ckpt))


def test_student_computes_the_engines_fp8_logits(plain):
    """Before training, the differentiable student is the engine's CPU FP8 pipeline (weights, per-token
    activations, FP8 KV cache) up to float32 rounding."""
    ids = IDS[:64]
    ref = _llm(plain).engine.executor.runner.logits_for_tokens(ids)
    ours = _student(plain).logits(torch.tensor(ids))
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _train(
    src: str, plain: str, lr: float, epochs: int = 3, average_last: int = 3
) -> tuple[FP8Student, dict, list[str]]:
    """Distill on three chunks, validating on the same three (a random model on random tokens has no
    held-out text to generalize to: this checks the optimization, the real text is docs/fp8-accuracy.md's)."""
    teacher = _llm(src).engine.executor.runner
    train = chunk_tokens(IDS[:192], 64)
    t_train = teacher_log_probs(teacher.logits_for_tokens, train)
    student = _student(plain)
    cfg = DistillConfig(
        tokens=192, val_tokens=192, chunk=64, epochs=epochs, lr=lr, accum=2, average_last=average_last
    )
    logs: list[str] = []
    return student, distill(student, train, train, t_train, t_train, cfg, log=logs.append), logs


def test_distill_lowers_kl_and_tunes_only_norms_and_scales(src, plain):
    student, result, logs = _train(src, plain, 1e-3)
    assert len(logs) == 5 and result["kept"] == "the mean of epochs 1-3"
    assert result["val_kl"] < result["val_kl_before"]
    tuned = student.tuned_tensors()
    assert len(tuned) == 1 + 2 * 2 + 2 * 7  # every norm gain and per-channel weight scale, nothing else
    ckpt = load_checkpoint_tensors(plain)
    for name, t in tuned.items():
        assert name.endswith(("norm.weight", "layernorm.weight", ".weight_scale")), name
        assert t.shape == ckpt[name].shape, name
        assert not torch.equal(t, ckpt[name]), name


def test_distill_keeps_the_starting_point_when_no_epoch_is_better(src, plain):
    """A learning rate far too large makes every epoch worse: the checkpoint's own values come back."""
    student, result, _ = _train(src, plain, 5.0, average_last=0)
    assert result["best_epoch"] == 0 and result["val_kl"] == result["val_kl_before"]
    assert result["kept"] == "epoch 0"
    ckpt = load_checkpoint_tensors(plain)
    for name, t in student.tuned_tensors().items():
        assert torch.equal(t, ckpt[name]), name


def test_distill_keeps_the_mean_of_the_last_epochs(src, plain):
    """average_last=2 of 2 epochs keeps the mean of the parameters after epoch 1 and after epoch 2 (the
    same chunk order: the one-epoch run is the two-epoch run's first epoch)."""
    one, _, _ = _train(src, plain, 3e-3, epochs=1, average_last=1)
    two, _, _ = _train(src, plain, 3e-3, epochs=2, average_last=1)
    mean, result, _ = _train(src, plain, 3e-3, epochs=2, average_last=2)
    assert result["kept"] == "the mean of epochs 1-2"
    t1, t2, tm = one.tuned_tensors(), two.tuned_tensors(), mean.tuned_tensors()
    for name, t in tm.items():
        assert not torch.equal(t1[name], t2[name]), name
        torch.testing.assert_close(t, (t1[name] + t2[name]) / 2, rtol=1e-6, atol=0), name


def test_quantize_distill_rewrites_only_norms_and_scales(src, tmp_path, capsys):
    # a periodic text: the validation tokens are like the training ones, so an epoch improves on them
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    common = ("--calib-file", str(text))
    plain = _quantize(src, str(tmp_path / "plain"), *common)
    out = _quantize(
        src, str(tmp_path / "qad"), *common, "--distill-tokens", "128", "--distill-val-tokens", "64",
        "--distill-epochs", "2", "--distill-lr", "1e-3", "--distill-accum", "2",
    )  # fmt: skip
    printed = capsys.readouterr()
    assert "distilled 19 tensors on 128 tokens" in printed.out
    assert "distill epoch 2" in printed.err
    ours, base = (
        load_file(os.path.join(out, "model.safetensors")),
        load_file(os.path.join(plain, "model.safetensors")),
    )
    assert ours.keys() == base.keys()
    for name, t in ours.items():
        assert t.dtype == base[name].dtype and t.shape == base[name].shape
        tuned = name.endswith(("norm.weight", "layernorm.weight", ".weight_scale"))
        same = torch.equal(t.reshape(-1).view(torch.uint8), base[name].reshape(-1).view(torch.uint8))
        assert same != tuned, name  # FP8 codes, KV scales, embeddings and LM head untouched
    # it loads back and runs with the tuned values
    model = _llm(out).engine.executor.runner.model
    assert torch.equal(model.model.norm.weight, ours["model.norm.weight"])
    o_proj = model.model.layers[1].self_attn.o_proj
    assert torch.equal(
        o_proj.weight_scale.reshape(-1), ours["model.layers.1.self_attn.o_proj.weight_scale"].reshape(-1)
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--per-tensor"], "drop --per-tensor"),
        (["--static-activations"], "drop --static-activations"),
        (["--keep-last-layers", "1"], "every linear layer in FP8"),
        (["--distill-epochs", "0"], "--distill-epochs must be at least 1"),
        (["--distill-lr", "0"], "--distill-lr must be positive"),
        (
            ["--distill-epochs", "2", "--distill-average-last", "3"],
            "--distill-average-last must be between 0",
        ),
        (["--distill-tokens", "1000"], "distillation needs 3048 calibration tokens"),
    ],
)
def test_quantize_distill_bad_flags_are_clear_errors(src, tmp_path, capsys, extra, match):
    """A one-line message and exit code 2, before any work (the text-length check after tokenizing)."""
    text = tmp_path / "short.txt"
    text.write_text("A short calibration text. " * 8)
    argv = ["quantize", "--model", src, "--output", str(tmp_path / "x"), "--kv-cache-dtype", "fp8"]
    argv += ["--calib-file", str(text)]
    flags = ["--distill-tokens", "64", *extra] if extra[0] != "--distill-tokens" else extra
    assert main([*argv, "--calib-tokens", "64", "--calib-seq-len", "32", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not os.path.exists(tmp_path / "x")


def test_default_average_is_three_epochs_or_every_epoch_if_fewer():
    """One default for the library and the CLI (which passes None when --distill-average-last is absent)."""
    assert DistillConfig(epochs=6).kept_last == 3
    assert DistillConfig(epochs=2).kept_last == 2
    assert DistillConfig(epochs=6, average_last=0).kept_last == 0
    with pytest.raises(ValueError, match="--distill-average-last"):
        DistillConfig(epochs=2, average_last=3).check()
