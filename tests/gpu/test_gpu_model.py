"""The whole GPU fast path (Triton kernels, FP8 GEMMs, CUDA graphs, async scheduling) against the
plain-torch reference path on the same weights."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from hopperllm import LLM, SamplingParams  # noqa: E402
from hopperllm.layers.attention import TorchAttentionBackend  # noqa: E402
from tests.helpers import assert_same_until_near_tie, make_hf_llama_dir  # noqa: E402

CFG = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("gpu_model")), seed=11, **CFG)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [
        {"prompt_token_ids": torch.randint(3, 2000, (n,), generator=g).tolist()} for n in (7, 100, 333, 1000)
    ]


def _greedy(llm, n=32, logprobs=None):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    return [o.outputs[0] for o in outs] if logprobs else [o.outputs[0].token_ids for o in outs]


def _reference(model_dir, **kw):
    """Plain-torch path on the GPU: torch attention, native norms, no graphs, no async."""
    llm = LLM(model=model_dir, enforce_eager=True, num_kv_blocks=512, show_progress=False, **kw)
    llm.engine.async_scheduling = False
    for attn in llm.engine.executor.runner.model.attention_layers():
        attn.backend = TorchAttentionBackend()
    return llm


def test_bf16_fast_path_greedy_equals_reference(model_dir):
    fast = LLM(model=model_dir, dtype="bfloat16", num_kv_blocks=512, max_num_seqs=8, show_progress=False)
    ref = _reference(model_dir, dtype="bfloat16")
    # bf16 logits near 8 are spaced 1/16 apart: a gap of one or two ulps is a tie at this precision
    assert_same_until_near_tie(_greedy(fast, logprobs=2), _greedy(ref, logprobs=2), max_gap=0.13)


def test_fp32_fast_path_greedy_equals_reference(model_dir):
    fast = LLM(model=model_dir, dtype="float32", num_kv_blocks=512, max_num_seqs=8, show_progress=False)
    ref = _reference(model_dir, dtype="float32")
    assert_same_until_near_tie(_greedy(fast, logprobs=2), _greedy(ref, logprobs=2), max_gap=1e-3)


def test_fp8_fast_path_matches_cpu_emulation(model_dir):
    """The GPU FP8 path (fused norm/SiLU quantization, Triton GEMV / cuBLAS FP8 GEMMs, FP8 KV cache) is as
    close to the unquantized model as the CPU emulation of the same FP8 scheme is: both only round."""
    ids = _prompts()[2]["prompt_token_ids"]
    kw = dict(
        dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=512, show_progress=False
    )
    lg = LLM(model=model_dir, max_num_seqs=8, **kw).engine.executor.runner.logits_for_tokens(ids).cpu()
    lc = LLM(model=model_dir, device="cpu", **kw).engine.executor.runner.logits_for_tokens(ids)
    exact = LLM(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=512, show_progress=False)
    lx = exact.engine.executor.runner.logits_for_tokens(ids)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    err_gpu, err_cpu = rel(lg, lx), rel(lc, lx)
    assert err_gpu < 1.25 * err_cpu + 0.02, (err_gpu, err_cpu, rel(lg, lc))
    top1_gpu = float((lg.argmax(-1) == lx.argmax(-1)).float().mean())
    top1_cpu = float((lc.argmax(-1) == lx.argmax(-1)).float().mean())
    assert top1_gpu > top1_cpu - 0.05, (top1_gpu, top1_cpu)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_prefill_graphs_greedy_equals_reference(model_dir, fp8, monkeypatch):
    """HOPPERLLM_PREFILL_GRAPHS=1: each prefill step of one sequence (whole prompts; chunks of 256 with
    cached context) replays a CUDA graph of 128-2048 rows, its padding rows writing no cache (on by default),
    its last layer's o_proj and MLP on the step's last row only. Greedy tokens
    equal the eager engine's (bf16: the reference path's) until a near tie."""
    from hopperllm.worker import model_runner

    monkeypatch.setattr(model_runner, "PREFILL_GRAPHS", True)
    kw = dict(dtype="bfloat16", num_kv_blocks=512, show_progress=False)
    if fp8:
        kw |= dict(quantization="fp8", kv_cache_dtype="fp8")
    for budget in (8192, 256):
        llm = LLM(model=model_dir, max_num_seqs=1, max_num_batched_tokens=budget, **kw)
        pg = llm.engine.executor.runner.prefill_graphs
        assert pg is not None and pg.sizes[0] == 128 and pg.sizes[-1] == min(budget, 2048)
        replays = []
        pg.replay = lambda t, n, real=pg.replay, seen=replays: seen.append(t) or real(t, n)
        got = _greedy(llm, logprobs=2)
        # the prompts (7, 100, 333, 1000 tokens) whole, or in chunks of 256 (the last 77 and 232)
        assert sorted(set(replays)) == ([128, 384, 1024] if budget == 8192 else [128, 256])
        del llm
        torch.cuda.empty_cache()
        monkeypatch.setattr(model_runner, "PREFILL_GRAPHS", False)
        eager = _greedy(LLM(model=model_dir, max_num_seqs=1, max_num_batched_tokens=budget, **kw), logprobs=2)
        monkeypatch.setattr(model_runner, "PREFILL_GRAPHS", True)
        assert_same_until_near_tie(got, eager, max_gap=0.13)
    if not fp8:
        assert_same_until_near_tie(
            got, _greedy(_reference(model_dir, dtype="bfloat16"), logprobs=2), max_gap=0.13
        )


def test_programmatic_dependent_launch_changes_no_bit(model_dir, monkeypatch):
    """PDL only lets a kernel start early and wait (griddepcontrol.wait) before touching memory: with it on
    and off, the FP8 fast path with CUDA graphs and async scheduling gives identical tokens and logprobs."""
    from hopperllm.kernels.pdl import pdl_enabled

    kw = dict(
        dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=512, max_num_seqs=8,
        show_progress=False,
    )  # fmt: skip
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("HOPPERLLM_PDL", flag)
        assert pdl_enabled(torch.device("cuda")) == (
            flag == "1" and torch.cuda.get_device_capability()[0] >= 9
        )
        llm = LLM(model=model_dir, **kw)
        outs[flag] = [(o.token_ids, o.logprobs) for o in _greedy(llm, logprobs=2)]
        del llm
        torch.cuda.empty_cache()
    assert outs["1"] == outs["0"]


def test_no_decode_attention_compiles_while_serving(model_dir):
    """Steps that mix decodes with prefills launch flash-decoding variants the decode graphs do not
    compile; start-up compiles them (ModelRunner.warm_mixed_decode_kernels), so serving compiles none."""
    from hopperllm.worker.jit_watch import JitWatch

    llm = LLM(
        model=model_dir, dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=512,
        max_num_seqs=8, max_num_batched_tokens=256, show_progress=False,
    )  # fmt: skip
    # the graphs hold up to 8 sequences: only the mixed steps' variants, with PDL
    variants = llm.engine.executor.runner.warm_decode_kernels(8)
    assert variants == [(n, False, False, True) for n in (1, 2, 4, 8, 16, 32)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with JitWatch() as jit:
        # prompts of 7 to 1000 tokens in chunks of 256 beside the earlier prompts' decodes: mixed steps
        # with 1-3 decodes at several context lengths
        llm.generate(_prompts(), params, use_tqdm=False)
    assert not [k for k in jit.compiled if "_decode_split_kernel" in k], jit.summary()


def test_no_decode_attention_compiles_beyond_the_graphs(model_dir, monkeypatch):
    """Decode-only steps larger than the largest graph run eagerly, and past PDL_MAX_ROWS without PDL (as
    --max-num-seqs 1024 does beyond the 512 graph: two compiles inside a throughput run before start-up
    covered them); here graphs of 1 and 2 sequences, PDL up to 4 rows and 8 prompts decoding together."""
    from hopperllm.kernels import pdl
    from hopperllm.worker.jit_watch import JitWatch

    monkeypatch.setattr(pdl, "PDL_MAX_ROWS", 4)
    llm = LLM(
        model=model_dir, dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=512,
        max_num_seqs=8, max_num_batched_tokens=2048, cuda_graph_sizes=[1, 2], show_progress=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 2000, (n,), generator=g).tolist()} for n in range(40, 360, 40)
    ]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with JitWatch() as jit:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert not [k for k in jit.compiled if "_decode_split_kernel" in k], jit.summary()
