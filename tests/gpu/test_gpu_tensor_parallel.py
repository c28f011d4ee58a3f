"""Tensor parallelism on GPUs (NCCL, CUDA graphs with the all-reduce inside, async scheduling): TP=2 gives
TP=1's logits and greedy tokens in bf16 and FP8; a model that does not fit is a ValueError naming the
numbers; Llama-2-70B in FP8 runs on one 80 GB GPU."""

from __future__ import annotations

import gc

import pytest
import torch

from hopperllm import LLM, SamplingParams
from tests.helpers import make_hf_llama_dir

needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
IDS = torch.randint(3, 32000, (200,), generator=torch.Generator().manual_seed(1)).tolist()
# bf16: TP=2 all-reduces partial sums in bf16 where TP=1 sums inside one GEMM in float32, so a few
# near-tied greedy choices may flip; the logits agree to a few bf16 ulps.
LOGITS_TOL = 2e-2
TOKEN_MATCH = 0.9

Result = tuple[torch.Tensor, list[list[int]]]  # (logits of IDS, greedy tokens of _prompts())


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (1, 7, 16, 33, 64, 100, 129, 300)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A Llama that fits one GPU with real-ish widths: GQA, 32k vocabulary, 4 layers."""
    return make_hf_llama_dir(
        str(tmp_path_factory.mktemp("tp_gpu")),
        seed=2,
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )


def _run_engine(model: str, tp: int, **kw) -> Result:
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("max_num_seqs", 16)
    llm = LLM(model=model, dtype="bfloat16", tensor_parallel_size=tp, show_progress=False, **kw)
    try:
        if tp > 1:
            assert llm.engine.async_scheduling and llm.engine.executor.supports_async
        logits = llm.engine.executor.logits_for_tokens(IDS).float().cpu()
        outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], GREEDY, use_tqdm=False)
        return logits, [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_match(got: Result, ref: Result) -> None:
    (logits, tokens), (ref_logits, ref_tokens) = got, ref
    assert _rel_err(logits, ref_logits) < LOGITS_TOL
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > TOKEN_MATCH
    same = sum(a == b for x, y in zip(tokens, ref_tokens, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= TOKEN_MATCH * sum(len(t) for t in ref_tokens), (tokens, ref_tokens)


@pytest.fixture(scope="module")
def bf16_ref(model_dir) -> Result:
    return _run_engine(model_dir, 1)


@pytest.fixture(scope="module")
def fp8_checkpoint(model_dir, tmp_path_factory) -> str:
    """Per-channel FP8 weights with static input scales: every rank holds TP=1's codes and scales."""
    from tests.quant.fp8_helpers import make_fp8_checkpoint

    dst = str(tmp_path_factory.mktemp("tp_gpu_fp8") / "ckpt")
    make_fp8_checkpoint(model_dir, dst, "compressed-tensors", per_channel=True, static=True, calib_ids=IDS)
    return dst


@needs_2_gpus
@pytest.mark.parametrize("allreduce", ["auto", "nccl"])
def test_bf16_tp2_matches_tp1(model_dir, bf16_ref, allreduce, monkeypatch):
    """auto: the one-shot symmetric-memory all-reduce for decode-sized tensors; nccl: NCCL for all."""
    monkeypatch.setenv("HOPPERLLM_ALLREDUCE", allreduce)  # the spawned ranks inherit it
    _assert_match(_run_engine(model_dir, 2), bf16_ref)


def _symm_all_reduce_rank(rank: int, world: int, port: int, errors) -> None:
    """One rank: the one-shot all-reduce equals NCCL's sum, eagerly and replayed from a CUDA graph."""
    try:
        import torch.distributed as dist

        from hopperllm.distributed.process_group import destroy_tp_group, init_tp_group

        tp = init_tp_group(rank, world, "cuda", port, 120.0)
        assert tp.small_all_reduce is not None, "the symmetric-memory all-reduce did not set up"
        g = torch.Generator(device="cuda").manual_seed(100 + rank)
        for shape, dtype in (
            ((1, 8192), torch.bfloat16),
            ((7, 5120), torch.bfloat16),
            ((3, 4096), torch.float32),
            ((64, 8192), torch.bfloat16),
            ((1, 1000), torch.float16),
        ):
            x = torch.randn(shape, generator=g, device="cuda").to(dtype)
            ref = x.clone()
            dist.all_reduce(ref, group=tp.group)
            assert tp.small_all_reduce.supports(x)
            got = tp.all_reduce(x.clone())
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        big = torch.randn(1024, 8192, generator=g, device="cuda").to(torch.bfloat16)  # 16 MiB: NCCL
        assert not tp.small_all_reduce.supports(big)
        # graph replay: new inputs each replay, the same buffers
        x = torch.empty(4, 8192, device="cuda", dtype=torch.bfloat16)
        x.copy_(torch.randn(4, 8192, generator=g, device="cuda"))
        tp.all_reduce(x.clone())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [tp.all_reduce(x * (i + 1)) for i in range(3)]
        for _ in range(5):
            x.copy_(torch.randn(4, 8192, generator=g, device="cuda"))
            graph.replay()
            for i, out in enumerate(outs):
                ref = x * (i + 1)
                dist.all_reduce(ref, group=tp.group)
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.cuda.synchronize()
        del graph
        destroy_tp_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {e!r}\n{traceback.format_exc()}")


@needs_2_gpus
def test_symm_mem_all_reduce_equals_nccl():
    import torch.multiprocessing as tmp

    from hopperllm.distributed.process_group import create_rendezvous_store

    store = create_rendezvous_store(120.0)
    ctx = tmp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_symm_all_reduce_rank, args=(r, 2, store.port, errors)) for r in range(2)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(180)
    msgs = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    for pr in procs:
        if pr.is_alive():
            pr.kill()
    assert not msgs, "\n".join(msgs)
    assert all(pr.exitcode == 0 for pr in procs), [pr.exitcode for pr in procs]


@needs_2_gpus
def test_fp8_checkpoint_tp2_matches_tp1(fp8_checkpoint):
    _assert_match(_run_engine(fp8_checkpoint, 2), _run_engine(fp8_checkpoint, 1))


@needs_2_gpus
def test_fp8_on_load_tp2_matches_tp1_to_fp8_precision(model_dir, bf16_ref):
    """Quantized on load, each rank scales its own slice (row-parallel rows, per-token activations over
    half the features): TP=2 is another FP8 rounding of the model, as close to bf16 as TP=1's."""
    ref_logits, _ = _run_engine(model_dir, 1, quantization="fp8")
    logits, tokens = _run_engine(model_dir, 2, quantization="fp8")
    quant_err = _rel_err(ref_logits, bf16_ref[0])
    assert _rel_err(logits, ref_logits) < quant_err
    assert _rel_err(logits, bf16_ref[0]) < 1.25 * quant_err
    assert [len(t) for t in tokens] == [GREEDY.max_tokens] * len(_prompts())


@needs_2_gpus
def test_tp2_cuda_graphs_match_eager(model_dir):
    """The decode graphs replay the captured NCCL all-reduces: the same tokens as eager TP=2."""
    assert _run_engine(model_dir, 2)[1] == _run_engine(model_dir, 2, enforce_eager=True)[1]


def test_model_too_large_is_a_value_error_naming_the_numbers():
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total_gib > 120:
        pytest.skip("bf16 Llama-2-70B (128 GiB) must not fit")
    with pytest.raises(
        ValueError, match=r"dummy:llama-2-70b needs 128\.5 GiB of weights per GPU at tensor_parallel_size 1"
    ):
        LLM(model="dummy:llama-2-70b", dtype="bfloat16", show_progress=False)


@needs_2_gpus
def test_model_too_large_for_the_ranks_is_a_value_error():
    with pytest.raises(ValueError, match=r"needs 64\.2 GiB of weights per GPU at tensor_parallel_size 2"):
        LLM(
            model="dummy:llama-2-70b",
            dtype="bfloat16",
            tensor_parallel_size=2,
            gpu_memory_utilization=0.3,
            show_progress=False,
        )


@pytest.mark.slow
def test_llama2_70b_fp8_runs_on_one_gpu():
    """65 GiB of FP8 weights made directly on the GPU (no bf16 copy), a KV cache for 2048 + 128 tokens."""
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total_gib < 75:
        pytest.skip(f"needs an 80 GB GPU ({total_gib:.0f} GiB here)")
    llm = LLM(
        model="dummy:llama-2-70b",
        quantization="fp8",
        max_model_len=2176,
        max_num_seqs=8,
        gpu_memory_utilization=0.95,
        show_progress=False,
    )
    try:
        weights = sum(p.numel() * p.element_size() for p in llm.engine.executor.runner.model.parameters())
        assert 64 * 2**30 < weights < 66 * 2**30
        assert llm.engine.num_kv_blocks * 16 >= 2176
        out = llm.generate(
            {"prompt_token_ids": list(range(3, 2051))},
            SamplingParams(max_tokens=8, ignore_eos=True),
            use_tqdm=False,
        )
        assert len(out[0].outputs[0].token_ids) == 8
    finally:
        llm.engine.shutdown()
