"""A one-shot all-reduce for small tensors through PyTorch's symmetric memory (CUDA only).

A decode step all-reduces a few KiB twice per layer (160 times a step for Llama-2-70B). NCCL's ring and
tree algorithms pay several microseconds of protocol per call at that size; the one-shot kernel copies
the local input into a buffer every rank can read over NVLink, meets the other ranks at a flag barrier,
reads every peer's buffer and sums (one launch, a barrier in and out: the buffer is reused safely by the
next call, and the kernel replays inside CUDA graphs). Larger tensors (prefill) stay on NCCL.

NVLink multicast is not used (`multimem` ops need it; it stays off on our machines): only peer loads.

`HOPPERLLM_ALLREDUCE=nccl` turns it off; `HOPPERLLM_SYMM_MEM_MAX_BYTES` sets the size limit (1 MiB).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot kernel sums
# The fused all-reduce + RMSNorm's exchange (FusedAllReduceNorm): Lamport push, measured on two H200s at
# 5.1 us a call alone against 5.8 for the one-barrier pull (mode 1) and a 70B decode step 0.07 ms shorter.
DEFAULT_FUSED_MODE = "4"


def fused_mode() -> str:
    """HOPPERLLM_FUSED_AR_NORM: 0 (off), 1 (pull, one barrier), 2 (pull, two barriers) or 4 (Lamport)."""
    mode = os.environ.get("HOPPERLLM_FUSED_AR_NORM", DEFAULT_FUSED_MODE)
    if mode not in ("0", "1", "2", "4"):
        raise ValueError(
            f"HOPPERLLM_FUSED_AR_NORM must be 0, 1, 2 or 4, got {mode!r} (3, the one-way-signal push, was "
            "removed: it measured slower than 1)"
        )
    return mode


class SymmMemAllReduce:
    def __init__(self, group, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def supports(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype in DTYPES
            and x.is_contiguous()
            and x.numel() * x.element_size() <= self.max_bytes
            and x.data_ptr() % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", self.group_name)


def _set_up_on_every_rank(group, device: torch.device, build, what: str, fallback: str):
    """`build()` -> (the object, "" or why it is wrong) on this rank; any exception counts as a failure.
    Returns the object only if every rank built it correctly (they must all take the same path), else
    logs why and returns None."""
    try:
        obj, why = build()
    except Exception as e:  # an unsupported platform (no peer access, old torch or Triton)
        obj, why = None, f"{type(e).__name__}: {e}"
    flag = torch.tensor([int(not why)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not int(flag.item()):
        logger.warning("%s unavailable (%s); %s", what, why or "another rank failed", fallback)
        return None
    return obj


def make_symm_all_reduce(group, rank: int, world_size: int, device: torch.device) -> SymmMemAllReduce | None:
    """The one-shot all-reduce if every rank could set it up and it sums correctly, else None (NCCL)."""
    if os.environ.get("HOPPERLLM_ALLREDUCE", "auto") == "nccl" or device.type != "cuda":
        return None
    max_bytes = int(os.environ.get("HOPPERLLM_SYMM_MEM_MAX_BYTES", DEFAULT_MAX_BYTES))

    def build():
        ar = SymmMemAllReduce(group, device, max_bytes)
        base = (torch.arange(4096, device=device) % 61).to(torch.bfloat16)  # small integers: exact sums
        expect = base * world_size + world_size * (world_size - 1) // 2
        return ar, "" if torch.equal(ar(base + rank), expect) else "it summed wrongly"

    ar = _set_up_on_every_rank(group, device, build, "symmetric-memory all-reduce", "using NCCL")
    if ar is not None:
        logger.info("one-shot symmetric-memory all-reduce for tensors up to %d bytes", max_bytes)
    return ar


class FusedAllReduceNorm:
    """All-reduce + residual add + RMSNorm (+ FP8) in one kernel (kernels/allreduce_norm.py) over its own
    symmetric-memory buffer and signal pad, for decode-sized tensors. `HOPPERLLM_FUSED_AR_NORM` picks
    the exchange (kernel docstring): 4 (default) pushes each rank's rows into its slot of every peer's
    buffer with no signal, each element's arrival marked by its bits (`lamport`: bfloat16 and float16 rows;
    float32 rows take the unfused path); 1 copies the rows into the rank's own buffer and meets the peers at
    one flag barrier a call over two alternating halves (pull); 2 the same with two barriers over one
    buffer; 0 turns the fusion off (the decoder then all-reduces in the row-parallel layers and normalizes
    separately). (3, a push with one-way signals, measured slower than 1 and was removed in v19.)"""

    def __init__(
        self, group, rank: int, world_size: int, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES
    ):
        import torch.distributed._symmetric_memory as symm_mem

        mode = fused_mode()
        if mode == "4":
            max_bytes *= world_size  # a slot per rank, each as large as the other modes' rows
        self.rank, self.world_size, self.max_bytes = rank, world_size, max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        self.lamport = mode == "4"
        if self.lamport:  # every slot EMPTY before any peer can write (the rendezvous below is collective)
            from hopperllm.kernels.allreduce_norm import EMPTY

            self.buffer.view(torch.int16).fill_(EMPTY.value)
            torch.cuda.synchronize(device)
        hdl = symm_mem.rendezvous(self.buffer, group.group_name)
        self.buffer_ptrs = torch.tensor(list(hdl.buffer_ptrs), dtype=torch.int64, device=device)
        self.signal_pad_ptrs = torch.tensor(list(hdl.signal_pad_ptrs), dtype=torch.int64, device=device)
        self.max_rows = int(hdl.signal_pad_size) // (4 * world_size)  # one int32 flag per row and rank
        self._hdl = hdl
        # one barrier a call: rows alternate between the buffer's halves by a per-row call count
        self.double = mode != "2"
        self.counters = torch.zeros(self.max_rows, dtype=torch.int32, device=device) if self.double else None
        self.half_bytes = max_bytes // 2 if self.double else max_bytes
        # bytes of one rank's rows: with lamport every rank's rows share each half
        self.data_bytes = self.half_bytes // world_size if self.lamport else self.half_bytes

    def supports(self, x: torch.Tensor) -> bool:
        """Whether x [T, H] (this rank's partial sums) fits the buffer and the signal pad."""
        return (
            x.is_cuda
            and x.dim() == 2
            and x.dtype in ((torch.bfloat16, torch.float16) if self.lamport else DTYPES)
            and x.is_contiguous()
            and x.shape[0] <= self.max_rows
            and x.numel() * x.element_size() <= self.data_bytes
        )

    def __call__(self, x, residual, weight, eps, out_fp8=False, static_scale=None):
        """(out, residual): see kernels.allreduce_norm.allreduce_rms_norm (residual updated in place)."""
        from hopperllm.kernels.allreduce_norm import allreduce_rms_norm

        out = allreduce_rms_norm(
            x, residual, weight, eps, self.buffer_ptrs, self.signal_pad_ptrs, self.rank, self.world_size,
            out_fp8=out_fp8, static_scale=static_scale, counters=self.counters,
            half_elems=self.half_bytes // residual.element_size(), lamport=self.lamport,
        )  # fmt: skip
        return out, residual


def make_fused_allreduce_norm(
    group, rank: int, world_size: int, device: torch.device
) -> FusedAllReduceNorm | None:
    """The fused all-reduce + RMSNorm if every rank set it up and it computes the reference's bits, else
    None (the layers all-reduce, then normalize)."""
    if fused_mode() == "0" or os.environ.get("HOPPERLLM_ALLREDUCE") == "nccl":
        return None
    from hopperllm.kernels.allreduce_norm import ref_allreduce_rms_norm

    def build():
        fused = FusedAllReduceNorm(group, rank, world_size, device)
        h = 4096
        g = torch.Generator(device=device).manual_seed(7)
        parts = [torch.randn(2, h, generator=g, device=device).to(torch.bfloat16) for _ in range(world_size)]
        weight = torch.randn(h, generator=g, device=device).to(torch.bfloat16)
        res = torch.randn(2, h, generator=g, device=device).to(torch.bfloat16)
        ref_res = res.clone()
        ref = ref_allreduce_rms_norm(parts, ref_res, weight, 1e-5)
        ok = True
        for _ in range(3):  # the flags must come back to zero for the next call
            out, r = fused(parts[rank].clone(), res.clone(), weight, 1e-5)
            ok = (
                ok
                and bool(torch.equal(r, ref_res))
                and bool(torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2))
            )
        torch.cuda.synchronize(device)
        return fused, "" if ok else "it computed wrongly"

    fused = _set_up_on_every_rank(
        group, device, build, "fused all-reduce + RMSNorm", "all-reducing separately"
    )
    if fused is not None:
        logger.info("fused all-reduce + RMSNorm for up to %d rows", fused.max_rows)
    return fused
