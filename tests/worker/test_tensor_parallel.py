"""Tensor parallelism on the CPU: two worker processes over gloo give TP=1's logits and tokens (float32,
FP8 quantized on load, an FP8 checkpoint), so do four and eight with one KV head per rank (Llama-2-70B's
layout at TP=8), each rank reads only its slices of the checkpoint, and a rank that dies or fails ends the
engine with an error naming it, in seconds, not a hang."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time

import pytest
import torch

from hopperllm import LLM, SamplingParams, StructuredOutputsParams
from hopperllm.distributed.parallel_state import TPGroup
from hopperllm.loader import hf_safetensors
from hopperllm.loader.hf_safetensors import LazyTensor, iter_safetensors
from hopperllm.models.llama import LlamaForCausalLM
from tests.helpers import make_hf_llama_dir

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LOGITS_IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(11)).tolist()


def _prompts(n: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [1, 3, 9, 16, 17, 31, 40, 57][:n]
    return [torch.randint(3, 290, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_hf_llama_dir(str(tmp_path_factory.mktemp("tp_model")), seed=5)


def _llm(model: str, tp: int, async_scheduling: bool = False, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    llm = LLM(model=model, dtype="float32", device="cpu", tensor_parallel_size=tp, show_progress=False, **kw)
    llm.engine.async_scheduling = async_scheduling  # off on the CPU by default; both paths must agree
    return llm


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [c.token_ids for o in outs for c in o.outputs]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- TP=2 equals TP=1 ---------------------------------------------------------------------------------------
def test_float32_tp2_matches_tp1(model_dir):
    ref = _llm(model_dir, 1)
    tp2 = _llm(model_dir, 2, num_kv_blocks=12, max_num_batched_tokens=24)  # preempts and chunks prefills
    try:
        assert isinstance(tp2.engine.executor.logits_for_tokens(LOGITS_IDS), torch.Tensor)
        ref_logits = ref.engine.executor.logits_for_tokens(LOGITS_IDS)
        logits = tp2.engine.executor.logits_for_tokens(LOGITS_IDS)
        assert logits.shape == ref_logits.shape == (len(LOGITS_IDS), 300)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)  # only the sum order differs

        ref_tokens = _tokens(ref, _prompts())
        assert len({tuple(t) for t in ref_tokens}) > 4, "random model too degenerate for a meaningful test"
        assert _tokens(tp2, _prompts()) == ref_tokens
        assert tp2.engine.get_stats().num_preemptions > 0

        # seeded sampling with penalties, n=2 and logprobs: every rank samples alike, rank 0 answers
        params = SamplingParams(
            n=2, max_tokens=8, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3, logprobs=2
        )
        ref_outs = ref.generate({"prompt_token_ids": _prompts()[4]}, params, use_tqdm=False)[0].outputs
        outs = tp2.generate({"prompt_token_ids": _prompts()[4]}, params, use_tqdm=False)[0].outputs
        assert [c.token_ids for c in outs] == [c.token_ids for c in ref_outs]
        assert outs[0].token_ids != outs[1].token_ids
        for c, r in zip(outs, ref_outs, strict=True):
            assert c.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-3)
        # structured outputs: each step's token bitmask goes to every rank with the sequence
        if importlib.util.find_spec("llguidance") is not None:
            so = SamplingParams(
                n=2,
                max_tokens=12,
                temperature=1.0,
                seed=3,
                structured_outputs=StructuredOutputsParams(regex="[a-f]{2,8}!"),
            )
            ref_outs = ref.generate({"prompt_token_ids": _prompts()[2]}, so, use_tqdm=False)[0].outputs
            outs = tp2.generate({"prompt_token_ids": _prompts()[2]}, so, use_tqdm=False)[0].outputs
            assert [c.text for c in outs] == [c.text for c in ref_outs]
            assert all(re.fullmatch("[a-f]{2,8}!", c.text) for c in outs), [c.text for c in outs]
        bm = tp2.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks
    finally:
        tp2.engine.shutdown()


def test_async_scheduling_tp2_matches_tp1(model_dir):
    """The engine launches step N+1 before reading step N back: ranks fill the placeholders from their
    own device copy of the sampled tokens and report a step when the next message reaches them."""
    ref = _tokens(_llm(model_dir, 1), _prompts())
    tp2 = _llm(model_dir, 2, async_scheduling=True)
    try:
        assert _tokens(tp2, _prompts()) == ref
        assert _tokens(tp2, _prompts(3, seed=1), SamplingParams(max_tokens=1, temperature=0.0)) == _tokens(
            _llm(model_dir, 1), _prompts(3, seed=1), SamplingParams(max_tokens=1, temperature=0.0)
        )
        # penalties stay async: every rank counts the in-flight token from its own copy of it
        pen = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, frequency_penalty=1.5)
        assert _tokens(tp2, _prompts(), pen) == _tokens(_llm(model_dir, 1), _prompts(), pen)
    finally:
        tp2.engine.shutdown()


def test_speculative_tp2_matches_tp1(model_dir):
    """n-gram drafts at TP=2: every rank computes the drafts' positions; the ranks' mirrors resend the
    tokens from the first draft, so rejected drafts never linger there."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    loops = [p * 3 for p in _prompts(4)]
    ref = _tokens(_llm(model_dir, 1), loops, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    tp2 = _llm(model_dir, 2, speculative_config=spec)
    try:
        got = _tokens(tp2, loops, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        assert got == ref and tp2.engine.num_draft_tokens > 0
    finally:
        tp2.engine.shutdown()


def _has_draft(worker) -> bool:
    return worker.draft is not None


@pytest.mark.parametrize("draft_tp", [None, 1], ids=["sharded", "first-rank"])
def test_draft_model_tp2_matches_tp1(model_dir, tmp_path, draft_tp):
    """A draft model at TP=2: every rank runs its shard of the draft beside the target's, or (draft
    tensor_parallel_size 1) the first rank runs all of it; requests finish and new ones reuse their ids between
    two rounds of drafts (the ranks' draft mirrors release them in order)."""
    from tests.engine.test_speculative_draft import first_layer_draft

    draft = first_layer_draft(model_dir, str(tmp_path / "draft"))
    spec = {"model": draft, "num_speculative_tokens": 3, "draft_tensor_parallel_size": draft_tp}
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref = _tokens(_llm(model_dir, 1), _prompts(6), params)
    tp2 = _llm(model_dir, 2, speculative_config=spec, max_num_batched_tokens=32)
    try:
        assert _tokens(tp2, _prompts(6), params) == ref
        e = tp2.engine
        assert 0 < e.num_accepted_tokens < e.num_draft_tokens
        has_draft = tp2.engine.executor.collective_rpc(_has_draft, reply_all=True)
        assert has_draft == ([True, True] if draft_tp is None else [True, False])
        for _ in range(2):  # the same request id twice: finished, released, drafted for again
            e.add_request("again", {"prompt_token_ids": _prompts(6)[5]}, params)
            out = None
            while e.has_unfinished_requests():
                out = e.step() or out
            assert out[0].outputs[0].token_ids == ref[5]
    finally:
        tp2.engine.shutdown()


def test_fp8_on_load_tp2_matches_tp1_to_fp8_precision(model_dir):
    """Each rank quantizes its own slice: a row-parallel layer's per-channel weight scales come from half
    a row and its per-token activation scales from half the features, so TP=2 is another FP8 rounding of
    the same model: as close to float32 as TP=1 is, and closer to TP=1 than FP8 is to float32. (An FP8
    checkpoint with static scales gives every rank TP=1's codes: the next test is exact.)"""
    ref = _llm(model_dir, 1, quantization="fp8")
    tp2 = _llm(model_dir, 2, quantization="fp8")
    try:
        ref_logits = ref.engine.executor.logits_for_tokens(LOGITS_IDS)
        logits = tp2.engine.executor.logits_for_tokens(LOGITS_IDS)
        fp32 = _llm(model_dir, 1).engine.executor.logits_for_tokens(LOGITS_IDS)
        quant_err = _rel_err(ref_logits, fp32)  # ~0.1 on this random model
        assert 0 < _rel_err(logits, ref_logits) < quant_err
        assert _rel_err(logits, fp32) < 1.25 * quant_err
        assert [len(t) for t in _tokens(tp2, _prompts())] == [GREEDY.max_tokens] * len(_prompts())
    finally:
        tp2.engine.shutdown()


def test_fp8_checkpoint_tp2_matches_tp1(model_dir, tmp_path):
    """A pre-quantized checkpoint (per-channel weight scales, static input scales): every rank holds the
    same FP8 codes and scales as TP=1, so the logits agree to float32 rounding."""
    from tests.quant.fp8_helpers import make_fp8_checkpoint

    ckpt = str(tmp_path / "fp8")
    make_fp8_checkpoint(
        model_dir, ckpt, "compressed-tensors", per_channel=True, static=True, calib_ids=LOGITS_IDS
    )
    ref = _llm(ckpt, 1)
    tp2 = _llm(ckpt, 2)
    try:
        ref_logits = ref.engine.executor.logits_for_tokens(LOGITS_IDS)
        torch.testing.assert_close(
            tp2.engine.executor.logits_for_tokens(LOGITS_IDS), ref_logits, rtol=1e-4, atol=1e-4
        )
        assert _tokens(tp2, _prompts()) == _tokens(ref, _prompts())
    finally:
        tp2.engine.shutdown()


# -- sharded loading --------------------------------------------------------------------------------------
def test_lazy_tensor_reads_only_the_narrowed_part(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    save_file({"w": t}, str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        lazy = LazyTensor(f.get_slice("w"))
        assert lazy.shape == (6, 8) and lazy.dtype == torch.float32 and lazy.dim() == 2 and lazy.numel() == 48
        part = lazy.narrow(1, 4, 4)[1:3]
        assert isinstance(part, LazyTensor) and part.shape == (2, 4)
        assert torch.equal(part.materialize(), t[1:3, 4:8])
        dst = torch.zeros(2, 4)
        dst.copy_(part)  # torch functions and tensor methods read it
        assert torch.equal(dst, t[1:3, 4:8])
        assert torch.equal(part.float() * 2, t[1:3, 4:8] * 2)
        assert torch.equal(torch.zeros_like(part), torch.zeros(2, 4))
        assert torch.equal(lazy[::2], t[::2])  # strided: read, then sliced
        with pytest.raises(IndexError):
            lazy.narrow(0, 4, 4)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_shard(model_dir, monkeypatch, rank):
    from hopperllm.config import ModelConfig
    from hopperllm.loader.hf_safetensors import read_hf_config

    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir))
    tp = TPGroup(rank, 2, None)  # loading needs no collectives
    eager = LlamaForCausalLM(cfg, torch.float32, None, tp)
    eager.load_weights(iter_safetensors(model_dir))
    read = []
    materialize = hf_safetensors.LazyTensor.materialize
    monkeypatch.setattr(
        LazyTensor, "materialize", lambda self: read.append(self.numel()) or materialize(self)
    )
    lazy = LlamaForCausalLM(cfg, torch.float32, None, tp)
    lazy.load_weights(iter_safetensors(model_dir, lazy=True))
    for (name, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    total = sum(t.numel() for _, t in iter_safetensors(model_dir))
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # replicated
    assert sum(read) == (total - norms) // 2 + norms


# -- does it fit? -----------------------------------------------------------------------------------------
def test_a_model_that_does_not_fit_names_the_numbers(monkeypatch):
    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.worker.worker import check_weights_fit

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(79.25 * gib), int(79.5 * gib)))
    gpu = torch.device("cuda", 0)

    def check(tp: int = 1, **kw) -> None:
        cfg, src = EngineArgs(
            model="dummy:llama-2-70b", device="cpu", dtype="bfloat16", **kw
        ).create_engine_config()
        check_weights_fit(cfg, src, tp, gpu)

    with pytest.raises(
        ValueError,
        match=r"dummy:llama-2-70b needs 128\.5 GiB of weights per GPU at tensor_parallel_size 1 \(bfloat16\) "
        r"plus 0\.31 GiB for the smallest KV cache; the GPU has 71\.3 GiB free at gpu_memory_utilization 0\.9",
    ):
        check()
    check(quantization="fp8")  # 64.8 GiB of FP8 weights fit an 80 GB GPU
    check(tp=2, tensor_parallel_size=2)  # and so does half of the bf16 model
    with pytest.raises(ValueError, match=r"needs 64\.8 GiB .* \(fp8 linear weights, bfloat16 embeddings\)"):
        check(quantization="fp8", gpu_memory_utilization=0.8)


# -- failures ---------------------------------------------------------------------------------------------
def _die_in_next_step(worker):
    if worker.rank == 1:

        def launch(*args, **kwargs):
            os._exit(3)

        worker.runner.launch = launch


def _raise_in_next_step(worker):
    if worker.rank == 1:

        def launch(*args, **kwargs):
            raise RuntimeError("injected failure")

        worker.runner.launch = launch


def _pids_gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "how, error",
    [
        ("kill", r"rank 1 died \(killed by SIGKILL\)"),
        ("exit", r"rank 1 died \(exit code 3\)"),
        ("raise", r"rank 1 failed while running step \d+: RuntimeError: injected failure"),
    ],
)
def test_a_failing_rank_fails_the_engine_fast(how, error):
    llm = _llm("dummy:tiny", 2)
    executor = llm.engine.executor
    pids = executor.worker_pids
    assert _tokens(llm, _prompts(2))  # healthy first
    if how == "kill":
        os.kill(pids[1], signal.SIGKILL)
    else:
        executor.collective_rpc(_die_in_next_step if how == "exit" else _raise_in_next_step)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=error):
        _tokens(llm, _prompts(4))
    assert time.monotonic() - t0 < 10
    assert _pids_gone(pids)  # the survivors were stopped, not left waiting in a collective
    with pytest.raises(RuntimeError, match=error):  # and the engine stays failed
        _tokens(llm, _prompts(1))
    llm.engine.shutdown()


def test_shutdown_stops_the_workers():
    llm = _llm("dummy:tiny", 2)
    pids = llm.engine.executor.worker_pids
    assert len(pids) == 2
    t0 = time.monotonic()
    llm.engine.shutdown()
    assert _pids_gone(pids) and time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match="shut down"):
        _tokens(llm, _prompts(1))


def test_sizes_that_do_not_shard_are_a_value_error():
    with pytest.raises(
        ValueError, match="key/value heads \\(2\\) is not divisible by tensor_parallel_size 4"
    ):
        _llm("dummy:tiny", 4)


def _rank_and_world(worker, offset: int = 0) -> tuple[int, int]:
    return worker.tp.rank + offset, worker.tp.world_size


@pytest.mark.parametrize("tp", [1, 2])
def test_collective_rpc_reaches_every_rank_through_either_executor(model_dir, tp):
    """The profiling scripts call rank-side functions through collective_rpc, one process or several."""
    llm = _llm(model_dir, tp)
    try:
        ex = llm.engine.executor
        assert ex.collective_rpc(_rank_and_world, offset=10) == (10, tp)
        assert ex.collective_rpc(_rank_and_world, reply_all=True) == [(r, tp) for r in range(tp)]
        logits = ex.collective_rpc("logits_for_tokens", LOGITS_IDS)
        assert logits.shape == (len(LOGITS_IDS), llm.engine.config.model_config.vocab_size)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp", [4, 8])
def test_one_kv_head_per_rank_matches_tp1(tmp_path, tp):
    """Llama-2-70B at tensor_parallel_size 8 leaves each rank one KV head and a group of query heads; the
    same layout in miniature (tp ranks, one KV head each, 4 query heads per KV head) gives TP=1's logits and
    greedy tokens."""
    model = make_hf_llama_dir(
        str(tmp_path / "m"), seed=7, hidden_size=128, num_attention_heads=4 * tp, num_key_value_heads=tp,
        intermediate_size=32 * tp, vocab_size=320,
    )  # fmt: skip
    ref = _llm(model, 1)
    llm = _llm(model, tp)
    try:
        torch.testing.assert_close(
            llm.engine.executor.logits_for_tokens(LOGITS_IDS[:16]),
            ref.engine.executor.logits_for_tokens(LOGITS_IDS[:16]),
            rtol=1e-4,
            atol=1e-4,
        )
        ref_tokens = _tokens(ref, _prompts(4))
        assert len({tuple(t) for t in ref_tokens}) > 2, "random model too degenerate for a meaningful test"
        assert _tokens(llm, _prompts(4)) == ref_tokens
    finally:
        llm.engine.shutdown()
