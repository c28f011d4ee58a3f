"""The token budget's default follows vLLM's usage contexts: 16384 offline and 8192 for a server on a GPU with
>= 70 GiB other than the A100, 8192 elsewhere; an explicit value always wins."""

import argparse
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from hopperllm.engine import arg_utils
from hopperllm.engine.arg_utils import EngineArgs, default_max_num_batched_tokens


def _fake_gpu(monkeypatch, name: str, gib: int) -> None:
    props = SimpleNamespace(name=name, total_memory=gib << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)


@pytest.mark.parametrize(
    ("name", "gib", "offline", "server"),
    [
        ("NVIDIA H100 80GB HBM3", 80, 16384, 8192),
        ("NVIDIA H200", 141, 16384, 8192),
        ("NVIDIA A100-SXM4-80GB", 80, 8192, 8192),
        ("NVIDIA L4", 24, 8192, 8192),
    ],
)
def test_gpu_defaults_by_usage_context(monkeypatch, name, gib, offline, server):
    _fake_gpu(monkeypatch, name, gib)
    assert default_max_num_batched_tokens("cuda", "llm_class") == offline
    assert default_max_num_batched_tokens("cuda", "openai_api_server") == server


def test_cpu_default_is_8192():
    assert default_max_num_batched_tokens("cpu", "llm_class") == 8192


def test_engine_config_resolves_the_default_and_keeps_explicit_values(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H200", 141)
    monkeypatch.setattr(EngineArgs, "resolve_device", lambda self: "cuda")
    base = EngineArgs(model="dummy:tiny")
    assert base.create_engine_config()[0].scheduler_config.max_num_batched_tokens == 16384
    server = dataclasses.replace(base, usage_context="openai_api_server")
    assert server.create_engine_config()[0].scheduler_config.max_num_batched_tokens == 8192
    explicit = dataclasses.replace(base, max_num_batched_tokens=4096)
    assert explicit.create_engine_config()[0].scheduler_config.max_num_batched_tokens == 4096


def test_without_chunked_prefill_the_default_holds_a_whole_prompt(monkeypatch):
    monkeypatch.setattr(arg_utils, "default_max_num_batched_tokens", lambda device, usage="llm_class": 512)
    cfg, _ = EngineArgs(
        model="dummy:tiny", enable_chunked_prefill=False, max_model_len=2048
    ).create_engine_config()
    assert cfg.scheduler_config.max_num_batched_tokens == 2048
    cfg, _ = EngineArgs(model="dummy:tiny", max_model_len=2048).create_engine_config()
    assert cfg.scheduler_config.max_num_batched_tokens == 512


def test_cli_flag_and_bad_values():
    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(
        p.parse_args(["--model", "dummy:tiny", "--max-num-batched-tokens", "512"])
    )
    assert args.create_engine_config()[0].scheduler_config.max_num_batched_tokens == 512
    assert EngineArgs.from_cli_args(p.parse_args(["--model", "dummy:tiny"])).max_num_batched_tokens is None
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 1"):
        EngineArgs(model="dummy:tiny", max_num_batched_tokens=0).create_engine_config()
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(model="dummy:tiny", usage_context="batch").create_engine_config()


def test_contexts_are_the_documented_ones():
    assert arg_utils.USAGE_CONTEXTS == ("llm_class", "openai_api_server")
