"""All-reduce + residual add + RMSNorm (+ FP8 quantization) in one kernel, for tensor-parallel decode.

A tensor-parallel decoder layer ends each half (attention, MLP) with a row-parallel projection whose
partial sums the ranks all-reduce, and the next thing it does is the fused residual add + RMSNorm. With
both as separate launches a decode step of Llama-2-70B runs 160 one-shot all-reduces and 160 norms
(about 7 and 3 us each at batch 1 on two H200s), and the all-reduce, launched by torch, breaks the chain
of programmatically dependent launches (`pdl.py`) twice a layer. Here one program per token row:

1. copies this rank's partial row into its symmetric-memory buffer (every rank can read every buffer
   over NVLink),
2. meets the same program of every other rank at a flag barrier (release: the copy is visible),
3. sums the rows of all ranks in rank order in float32 and rounds to the activation dtype (every rank
   computes the same bits: that is the all-reduce's result), then r = round(sum + residual) is written
   back into `residual` and normalized exactly as `norm._rms_norm_kernel` does, emitting the activation
   dtype or FP8 with a per-token (or static) scale,
4. meets the other ranks again (their reads of this rank's buffer are done before a later call writes
   it); or, with `counters` (the default of `FusedAllReduceNorm`), does not: each row's calls alternate
   between the two halves of the buffers by a per-row call count kept on the GPU, so a call writes the half
   the previous call did not read, and the call before that was read completely before this rank could
   pass the previous call's barrier (the peer signals a call only once its kernel for the call before has
   finished). One barrier a call instead of two.

With `lamport` (`HOPPERLLM_FUSED_AR_NORM=4`, the default; bfloat16 / float16 rows), no flags at all: every
buffer starts filled with EMPTY bits (0x8000, -0.0), a program stores its row (with -0.0 sent as +0.0) into
its slot of every peer's buffer, polls its own buffer's peer slots (volatile loads) until no element holds
EMPTY any more, sums, and stores EMPTY back into those slots. Each element carries its own arrival, so
nothing waits for a fence or a round trip: one NVLink write's latency a call (the scheme of TensorRT-LLM's
Lamport all-reduce). Reuse is safe with the two halves: a peer writes this half again only in the call two
later, after it has received this rank's next row, which this rank sends in a later kernel than the one
that re-armed the slots.

The barrier: each program owns one 32-bit flag per rank in every rank's signal pad. To signal rank p,
a program compare-and-swaps 0 -> 1 into p's flag for (program, this rank); to wait for rank p, it
compare-and-swaps 1 -> 0 its own flag for (program, p). The flags return to zero after each barrier, so
the kernel needs no counter from the host and replays inside CUDA graphs. (The same handshake as the
one-shot all-reduce of PyTorch's symmetric memory and of meta-pytorch/kraken.) Program p of one rank
waits only for program p of the others, never for another program of its own grid, so it cannot
deadlock on a GPU however many programs are resident; under PDL the next kernel launches only after
every program here has started.

On CPU (the Triton interpreter, tests) the barrier is compiled out (`SYNC=False`): the peers' rows are
read from buffers the caller filled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hopperllm.kernels.launch import next_power_of_2
from hopperllm.kernels.norm import norm_outputs, rms_norm_row_store
from hopperllm.kernels.pdl import pdl_kwargs, pdl_prologue

EMPTY = tl.constexpr(-32768)  # 0x8000, -0.0 in bfloat16 and float16: a Lamport slot not yet written


@triton.jit
def _flag_handshake(addrs, peers, FROM: tl.constexpr, TO: tl.constexpr, SEM: tl.constexpr):
    # Element p of `addrs` is handled by the thread whose index is p (whatever the layout replicates,
    # the one thread of index p holds element p), which spins until the flag at addrs[p] equals FROM
    # and swaps in TO. Labels are local to the braces, so the asm may appear several times.
    return tl.inline_asm_elementwise(
        f"""
        {{
        .reg .u32 %me, %old;
        .reg .pred %mine, %done;
        mov.u32 %me, %tid.x;
        setp.eq.u32 %mine, %me, $2;
        @!%mine bra skip;
        again:
        atom.global.{SEM}.sys.cas.b32 %old, [$1], {FROM}, {TO};
        setp.eq.u32 %done, %old, {FROM};
        @!%done bra again;
        skip:
        mov.u32 $0, 0;
        }}
        """,
        "=r,l,r",
        [addrs, peers],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _barrier(signal_pads_ptr, row, RANK: tl.constexpr, WORLD: tl.constexpr, SEND_SEM: tl.constexpr,
             WAIT_SEM: tl.constexpr):  # fmt: skip
    # Thread p signals rank p (0 -> 1 into p's flag for this row and rank), then waits for rank p
    # (1 -> 0 on this rank's flag for this row and p); bar.sync fences the whole program around it.
    peers = tl.arange(0, WORLD)
    pads = signal_pads_ptr.to(tl.pointer_type(tl.uint64))
    remote = tl.load(pads + peers).to(tl.pointer_type(tl.int32))
    local = tl.load(pads + RANK).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()
    _flag_handshake(remote + row * WORLD + RANK, peers, 0, 1, SEND_SEM)
    _flag_handshake(local + row * WORLD + peers, peers, 1, 0, WAIT_SEM)
    tl.debug_barrier()


@triton.jit
def _allreduce_rms_norm_kernel(
    x_ptr, buffers_ptr, signal_pads_ptr, counters_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr,
    H, half_elems, stride_x, stride_res, stride_out, eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    SYNC: tl.constexpr,
    DOUBLE: tl.constexpr,
    LAMPORT: tl.constexpr,
    OUT_FP8: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = x_ptr.dtype.element_ty
    bufs = buffers_ptr.to(tl.pointer_type(tl.uint64))
    # Before the PDL wait, what no recent kernel writes (off the critical path after it): the buffer
    # addresses and the norm weight (constants); this row's call count and residual, last written by the
    # previous call of this kernel on the row, at least three kernels back in the stream (a decoder layer
    # runs >= 2 launches between its norms), which has finished: kernel N starts only after kernel N - 1
    # passed its wait, i.e. after kernel N - 2 finished (pdl.py). Those two are read from L2 (".cg"), the
    # GPU's point of coherence: an SM's L1 may still hold a line from an earlier call's read.
    own = tl.load(bufs + RANK).to(tl.pointer_type(dtype))
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(residual_ptr + row * stride_res + offs, mask=mask, other=0.0, cache_modifier=".cg")
    base = row * H
    if DOUBLE:  # this row's calls alternate between the buffers' halves (module docstring)
        n = tl.load(counters_ptr + row, cache_modifier=".cg")
        base += (n % 2).to(tl.int64) * half_elems
    pdl_prologue(USE_PDL)
    if DOUBLE:
        tl.debug_barrier()  # every thread has read the count before any writes the next one
        tl.store(counters_ptr + row, n + 1)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if LAMPORT:
        # Push without flags (module docstring): a 16-bit element whose bits are EMPTY (-0.0) has not
        # arrived yet. This rank's row is sent with -0.0 as +0.0 (the sum's bits do not change: it starts
        # from +0.0), polled for in every peer's slot, summed in rank order and the slot re-armed.
        slot = half_elems // WORLD
        bits = x.to(tl.int16, bitcast=True)
        bits = tl.where(bits == EMPTY, tl.zeros_like(bits), bits)
        for r in tl.static_range(WORLD):
            if r != RANK:
                dst = tl.load(bufs + r).to(tl.pointer_type(tl.int16))
                tl.store(dst + base + RANK * slot + offs, bits, mask=mask)
        own_bits = own.to(tl.pointer_type(tl.int16))
        for r in tl.static_range(WORLD):
            if r == RANK:
                acc += x.to(tl.float32)
            else:
                src = own_bits + base + r * slot + offs
                got = tl.load(src, mask=mask, other=0, volatile=True)
                if SYNC:
                    while tl.max((got == EMPTY).to(tl.int32), axis=0) > 0:
                        got = tl.load(src, mask=mask, other=0, volatile=True)
                tl.store(src, tl.full([BLOCK], EMPTY, tl.int16), mask=mask)  # for the call two later
                acc += got.to(dtype, bitcast=True).to(tl.float32)
    else:
        tl.store(own + base + offs, x, mask=mask)
        if SYNC:
            _barrier(signal_pads_ptr, row, RANK, WORLD, "release", "acquire")
        for r in tl.static_range(WORLD):
            peer = tl.load(bufs + r).to(tl.pointer_type(dtype))
            acc += tl.load(peer + base + offs, mask=mask, other=0.0).to(tl.float32)
    if SYNC and not DOUBLE:
        _barrier(signal_pads_ptr, row, RANK, WORLD, "release", "relaxed")
    reduced = acc.to(dtype)
    xr = (reduced.to(tl.float32) + res.to(tl.float32)).to(dtype)
    tl.store(residual_ptr + row * stride_res + offs, xr, mask=mask)
    rms_norm_row_store(xr, row, offs, mask, H, eps, w, out_ptr, scale_ptr, stride_out, OUT_FP8, STATIC_SCALE)


def ref_allreduce_rms_norm(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Torch reference: sum the ranks' partial rows in rank order in float32, round to their dtype, then
    `norm.ref_rms_norm` with the residual (updated in place). Returns the normalized output."""
    from hopperllm.kernels.norm import ref_rms_norm

    acc = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for p in partials:
        acc += p.float()
    return ref_rms_norm(acc.to(partials[0].dtype), weight, eps, residual)


def allreduce_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    buffer_ptrs: torch.Tensor,
    signal_pad_ptrs: torch.Tensor | None,
    rank: int,
    world_size: int,
    out_fp8: bool = False,
    static_scale: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    half_elems: int = 0,
    lamport: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """All-reduce this rank's partial sums x [T, H] over the ranks, add the result into `residual` [T, H]
    (in place) and RMS-normalize it (module docstring). Returns out (x.dtype) or with `out_fp8`
    (out_fp8, scale [T, 1] float32, or static_scale).

    buffer_ptrs: int64 [world_size] device addresses of each rank's buffer of at least T * H elements of
    x.dtype (symmetric memory); signal_pad_ptrs: int64 [world_size] addresses of each rank's signal pad,
    at least T * world_size zeroed int32 flags; None runs without the barrier (one process holding every
    rank's buffer, as the CPU tests do). counters: int32 [>= T] zero-initialized call counts (this rank's
    own memory, kept between calls) to alternate each row between the buffer's first `half_elems`
    elements and the next ones with one barrier a call; None: the first half only, two barriers.
    lamport (needs counters, a 16-bit dtype, and buffers filled with EMPTY bits, 0x8000): each half holds
    world_size slots of half_elems // world_size elements; this rank's rows go into its slot of every peer's
    buffer, the peers' slots of this rank's buffer are polled until no element holds EMPTY, summed, and
    refilled with EMPTY."""
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"x must be [T, H] and residual match it, got {tuple(x.shape)} {x.dtype} and "
            f"{tuple(residual.shape)} {residual.dtype}"
        )
    T, H = x.shape
    if weight.shape != (H,):
        raise ValueError(f"weight must have shape ({H},), got {tuple(weight.shape)}")
    if x.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("x and residual must be contiguous in their last dimension")
    if buffer_ptrs.shape != (world_size,) or buffer_ptrs.dtype != torch.int64:
        raise ValueError(
            f"buffer_ptrs must be int64 [{world_size}], got {buffer_ptrs.dtype} {tuple(buffer_ptrs.shape)}"
        )
    slots = world_size if lamport else 1
    if counters is not None and (
        counters.dtype != torch.int32 or counters.numel() < T or half_elems < slots * T * H
    ):
        raise ValueError(f"counters must be int32 [>= {T}] with half_elems >= {slots * T * H}")
    if lamport and (counters is None or x.dtype.itemsize != 2):
        raise ValueError(f"lamport needs counters and a 16-bit activation dtype, got {x.dtype}")
    out, scale = norm_outputs(T, H, x, out_fp8, static_scale)
    block = next_power_of_2(H)
    if T > 0:
        _allreduce_rms_norm_kernel[(T,)](
            x, buffer_ptrs, buffer_ptrs if signal_pad_ptrs is None else signal_pad_ptrs,
            buffer_ptrs if counters is None else counters, residual, weight, out,
            scale, H, half_elems, x.stride(0), residual.stride(0), out.stride(0), eps,
            RANK=rank,
            WORLD=world_size,
            SYNC=signal_pad_ptrs is not None,
            DOUBLE=counters is not None,
            LAMPORT=lamport,
            OUT_FP8=out_fp8,
            STATIC_SCALE=static_scale is not None,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
            **pdl_kwargs(x.device, T),
        )  # fmt: skip
    if not out_fp8:
        return out
    return out, (scale if static_scale is None else static_scale)
