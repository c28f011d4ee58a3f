"""allreduce_rms_norm (all-reduce + residual add + RMSNorm + FP8) vs ref_allreduce_rms_norm, one process.

Every rank's buffer lives in this process and the barrier is compiled out (signal_pad_ptrs=None): the
kernel copies its own partial rows into its buffer and sums every rank's rows. Without CUDA it runs in the
Triton interpreter; the barrier across GPUs is tested in tests/gpu/test_gpu_tensor_parallel.py.
"""

import pytest
import torch

from hopperllm.kernels import allreduce_norm, fp8, norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

EPS = 1e-5


def _rank_inputs(T, H, world, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(T, H, generator=g) * (r + 1)).to(dtype).to(DEVICE) for r in range(world)]
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype).to(DEVICE)
    residual = (3 * torch.randn(T, H, generator=g)).to(dtype).to(DEVICE)
    return parts, weight, residual


def _unfused(parts, weight, residual, **kw):
    """What the layers compute without the fusion: the all-reduce's result (rank-order float32 sum, rounded),
    then the fused add + RMSNorm kernel."""
    acc = sum(p.float() for p in parts)
    res = residual.clone()
    return norm.rms_norm(acc.to(parts[0].dtype), weight, EPS, residual=res, **kw), res


def _run_rank(parts, weight, residual, rank, **kw):
    """The kernel as rank `rank` sees it: the other ranks' buffers already hold their partial rows."""
    bufs = [torch.full_like(p, float("nan")).reshape(-1) for p in parts]
    for r, p in enumerate(parts):
        if r != rank:
            bufs[r].copy_(p.reshape(-1))
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    res = residual.clone()
    out = allreduce_norm.allreduce_rms_norm(parts[rank], res, weight, EPS, ptrs, None, rank, len(parts), **kw)
    return out, res, bufs[rank].view_as(parts[rank])


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("T,H", [(1, 64), (3, 96), (5, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_allreduce_rms_norm_equals_reference(world, T, H, dtype):
    parts, weight, residual = _rank_inputs(T, H, world, dtype, seed=T * H + world)
    ref_res = residual.clone()
    ref = allreduce_norm.ref_allreduce_rms_norm(parts, ref_res, weight, EPS)
    unfused, unfused_res = _unfused(parts, weight, residual)
    assert torch.equal(unfused_res, ref_res)
    for rank in range(world):
        out, res, own = _run_rank(parts, weight, residual, rank)
        torch.testing.assert_close(own, parts[rank], rtol=0, atol=0)  # the copy the peers read
        torch.testing.assert_close(res, ref_res, rtol=0, atol=0)  # every rank: the same residual bits
        torch.testing.assert_close(out, unfused, rtol=0, atol=0)  # the bits of the unfused kernels
        # and the torch reference up to the sum-of-squares order (fp32), one ulp (bf16): as test_norm.py
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
        torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.parametrize("static", [False, True])
def test_allreduce_rms_norm_fp8_output(static):
    T, H, world = 4, 160, 2
    parts, weight, residual = _rank_inputs(T, H, world, torch.bfloat16, seed=11)
    static_scale = torch.tensor([0.02], device=DEVICE) if static else None
    (ref_q, ref_s), _ = _unfused(parts, weight, residual, out_fp8=True, static_scale=static_scale)
    for rank in range(world):
        (q, s), _, _ = _run_rank(parts, weight, residual, rank, out_fp8=True, static_scale=static_scale)
        assert q.dtype == fp8.FP8_DTYPE and s.shape == ref_s.shape
        torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_allreduce_rms_norm_rejects_bad_shapes():
    parts, weight, residual = _rank_inputs(2, 64, 2, torch.bfloat16, seed=0)
    ptrs = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        allreduce_norm.allreduce_rms_norm(parts[0], residual[:1], weight, EPS, ptrs, None, 0, 2)
    with pytest.raises(ValueError, match="weight"):
        allreduce_norm.allreduce_rms_norm(parts[0], residual, weight[:32], EPS, ptrs, None, 0, 2)
    with pytest.raises(ValueError, match="buffer_ptrs"):
        allreduce_norm.allreduce_rms_norm(parts[0], residual, weight, EPS, ptrs[:1], None, 0, 2)


def test_allreduce_rms_norm_alternates_buffer_halves():
    """With counters, each row's calls alternate between the buffers' halves (one barrier a call): the
    second call reads the peers' second half, the third the first half again."""
    T, H, world, rank = 3, 64, 2, 1
    half = 4 * T * H  # elements per half, more than T * H
    counters = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    bufs = [torch.full((2 * half,), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    for call in range(3):
        parts, weight, residual = _rank_inputs(T, H, world, torch.bfloat16, seed=40 + call)
        lo = (call % 2) * half
        bufs[0][lo : lo + T * H].copy_(parts[0].reshape(-1))  # the peer's rows, in this call's half
        ref_res = residual.clone()
        ref, _ = _unfused(parts, weight, ref_res)
        res = residual.clone()
        out = allreduce_norm.allreduce_rms_norm(
            parts[rank], res, weight, EPS, ptrs, None, rank, world, counters=counters, half_elems=half
        )
        assert torch.equal(bufs[rank][lo : lo + T * H].view(T, H), parts[rank])
        assert torch.equal(out, ref)
        assert counters.tolist() == [call + 1] * T
    with pytest.raises(ValueError, match="counters"):
        allreduce_norm.allreduce_rms_norm(
            parts[rank], res, weight, EPS, ptrs, None, rank, world, counters=counters, half_elems=T * H - 1
        )


@pytest.mark.parametrize("world", [2, 4, 8])
def test_allreduce_rms_norm_lamport_pushes_and_rearms(world):
    """lamport: the kernel stores its rows (-0.0 sent as +0.0) into its slot of every peer's buffer, sums
    the peers' slots of its own buffer in rank order (the unfused bits) and refills them with EMPTY."""
    T, H, rank = 2, 96, 1
    half = world * T * H + 32
    slot = half // world
    empty = allreduce_norm.EMPTY.value
    counters = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    bufs = [torch.full((2 * half,), empty, dtype=torch.int16, device=DEVICE) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)

    def lamport(x, res, weight, half_elems=half, counters=counters):
        return allreduce_norm.allreduce_rms_norm(
            x,
            res,
            weight,
            EPS,
            ptrs,
            None,
            rank,
            world,
            counters=counters,
            half_elems=half_elems,
            lamport=True,
        )

    for call in range(3):
        parts, weight, residual = _rank_inputs(T, H, world, torch.bfloat16, seed=80 + call)
        parts[rank][0, 5] = -0.0
        lo = (call % 2) * half
        for p in range(world):  # what the peers pushed into this rank's buffer
            if p != rank:
                bufs[rank][lo + p * slot : lo + p * slot + T * H].copy_(
                    parts[p].reshape(-1).view(torch.int16)
                )
        ref, ref_res = _unfused(parts, weight, residual)
        res = residual.clone()
        out = lamport(parts[rank], res, weight)
        assert torch.equal(out, ref) and torch.equal(res, ref_res)
        sent = parts[rank].reshape(-1).view(torch.int16).clone()
        assert sent[5] == empty
        sent[5] = 0
        for p, b in enumerate(bufs):
            mine = b[lo + rank * slot : lo + rank * slot + T * H]
            if p == rank:  # nothing for itself; the peers' slots re-armed for the call two later
                assert (b[lo : lo + half] == empty).all()
            else:
                assert torch.equal(mine, sent)
        assert (bufs[rank][half - lo : 2 * half - lo] == empty).all()  # the other half untouched
    with pytest.raises(ValueError, match="lamport needs"):
        lamport(parts[rank].float(), res.float(), weight.float())
    with pytest.raises(ValueError, match="lamport needs"):
        lamport(parts[rank], res, weight, counters=None)
