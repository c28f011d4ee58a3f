"""Process groups for tensor parallelism: one process per rank, NCCL between GPUs, gloo on the CPU.

The driver hosts the rendezvous store on a loopback port the OS picks (port 0: no race for a "free"
port); each rank connects to it, joins the group and gets the TPGroup its layers all-reduce over.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from hopperllm.distributed.parallel_state import SINGLE, TPGroup

# NVLink SHARP (multicast) stays off: the machines this runs on do not lend it reliably, and NCCL's ring
# and tree all-reduces are what the decode step is tuned for.
NVLS_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

LOOPBACK = "127.0.0.1"


def create_rendezvous_store(timeout_s: float) -> dist.TCPStore:
    """The driver's store; ranks reach it at (LOOPBACK, store.port)."""
    return dist.TCPStore(
        LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


def init_tp_group(rank: int, world_size: int, device_type: str, port: int, timeout_s: float) -> TPGroup:
    """Join the tensor-parallel group as `rank` (call once per process, before any CUDA work).

    On CUDA rank r drives GPU r (NCCL); on the CPU the group uses gloo."""
    if world_size == 1:
        return SINGLE
    os.environ.update(NVLS_OFF_ENV)
    timeout = timedelta(seconds=timeout_s)
    device_id = None
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
        backend = "nccl"
    else:
        backend = "gloo"
    store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
    )
    small = fused = None
    if device_id is not None:
        from hopperllm.distributed.symm_all_reduce import make_fused_allreduce_norm, make_symm_all_reduce

        small = make_symm_all_reduce(dist.group.WORLD, rank, world_size, device_id)
        fused = make_fused_allreduce_norm(dist.group.WORLD, rank, world_size, device_id)
    return TPGroup(rank, world_size, dist.group.WORLD, small, fused)


def all_reduce_min(tp: TPGroup, value: int, device: torch.device) -> int:
    """The smallest `value` over the ranks (e.g. the KV-cache blocks every rank has room for)."""
    if tp.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


def warm_up(tp: TPGroup, device: torch.device) -> None:
    """One eager all-reduce, so that NCCL's communicator and buffers exist before a CUDA-graph capture."""
    if tp.world_size == 1:
        return
    tp.all_reduce(torch.ones(1, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
