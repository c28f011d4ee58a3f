"""--generation-config (vLLM's rule): a model's generation_config.json sets the sampling defaults of requests that
leave them unset, in the Python API (LLM.get_default_sampling_params, LLM.generate without params) and in the
OpenAI server; "vllm" turns that off; a folder path reads that folder's file."""

from __future__ import annotations

import json

import httpx
import pytest

from hopperllm import LLM, SamplingParams
from hopperllm.engine.arg_utils import EngineArgs
from hopperllm.loader.model_loader import generation_defaults, resolve_model
from tests.entrypoints.openai_utils import ThreadServer
from tests.helpers import make_hf_llama_dir

GEN = {
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "max_new_tokens": 7,
    "do_sample": True,
    "bos_token_id": 1,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_hf_llama_dir(str(tmp_path_factory.mktemp("gen_model")), seed=4)
    with open(f"{d}/generation_config.json", "w") as f:
        json.dump(GEN, f)
    return d


def test_defaults_from_the_model_folder(model_dir, tmp_path):
    src = resolve_model(model_dir)
    assert generation_defaults("auto", src) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 7,
    }
    assert generation_defaults("vllm", src) == {}
    assert generation_defaults("auto", resolve_model("dummy:tiny")) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    assert generation_defaults(str(tmp_path), src) == {"temperature": 0.3}
    with pytest.raises(ValueError, match="no generation_config.json"):
        generation_defaults(str(tmp_path / "nowhere"), src)


def test_llm_uses_them_when_no_params_are_given(model_dir):
    llm = LLM(model=model_dir, device="cpu", dtype="float32", show_progress=False)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 20, 7)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 7
    plain = LLM(model=model_dir, device="cpu", dtype="float32", show_progress=False, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()


def test_server_fills_unset_fields_from_them(model_dir):
    with ThreadServer(engine_kwargs={"model": model_dir, "dtype": "float32"}) as srv:
        body = {"prompt": [5, 6, 7], "max_tokens": 6, "seed": 11, "ignore_eos": True}
        got = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=30).json()
        explicit = httpx.post(
            f"{srv.base_url}/v1/completions",
            json={**body, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
            timeout=30,
        ).json()
    llm = LLM(model=model_dir, device="cpu", dtype="float32", show_progress=False)
    ref = llm.generate(
        {"prompt_token_ids": [5, 6, 7]},
        SamplingParams(max_tokens=6, seed=11, ignore_eos=True, temperature=0.6, top_p=0.9, top_k=20),
        use_tqdm=False,
    )[0]
    plain = llm.generate(
        {"prompt_token_ids": [5, 6, 7]},
        SamplingParams(max_tokens=6, seed=11, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert got["choices"][0]["text"] == ref.outputs[0].text
    assert explicit["choices"][0]["text"] == plain.outputs[0].text


def test_engine_args_carry_the_flag():
    import argparse

    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(p.parse_args(["--generation-config", "vllm"])).generation_config == "vllm"
    assert EngineArgs.from_cli_args(p.parse_args([])).generation_config == "auto"
