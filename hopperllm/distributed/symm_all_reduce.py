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


def make_symm_all_reduce(group, rank: int, world_size: int, device: torch.device) -> SymmMemAllReduce | None:
    """The one-shot all-reduce if every rank could set it up and it sums correctly, else None (NCCL)."""
    if os.environ.get("HOPPERLLM_ALLREDUCE", "auto") == "nccl" or device.type != "cuda":
        return None
    max_bytes = int(os.environ.get("HOPPERLLM_SYMM_MEM_MAX_BYTES", DEFAULT_MAX_BYTES))
    ar, why = None, ""
    try:
        ar = SymmMemAllReduce(group, device, max_bytes)
        base = (torch.arange(4096, device=device) % 61).to(torch.bfloat16)  # small integers: exact sums
        expect = base * world_size + world_size * (world_size - 1) // 2
        ok = bool(torch.equal(ar(base + rank), expect))
        if not ok:
            why = "it summed wrongly"
    except Exception as e:  # an unsupported platform (no peer access, old torch): NCCL does the work
        ok, why = False, f"{type(e).__name__}: {e}"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)  # every rank takes the same path
    if not int(flag.item()):
        logger.warning(
            "symmetric-memory all-reduce unavailable (%s); using NCCL", why or "another rank failed"
        )
        return None
    logger.info("one-shot symmetric-memory all-reduce for tensors up to %d bytes", max_bytes)
    return ar
