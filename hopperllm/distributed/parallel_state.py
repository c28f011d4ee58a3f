"""The tensor-parallel group a model is built for. Passed explicitly to layers (no global state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when world_size > 1
    small_all_reduce: Any = None  # SymmMemAllReduce for small CUDA tensors (symm_all_reduce.py), or None
    fused_norm: Any = None  # FusedAllReduceNorm (symm_all_reduce.py): all-reduce + add + RMSNorm, or None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks; in place through NCCL/gloo, or a new tensor from the one-shot kernel:
        use the return value."""
        if self.world_size == 1:
            return x
        if self.small_all_reduce is not None and self.small_all_reduce.supports(x):
            return self.small_all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dimension (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, size: int, what: str) -> int:
        if size % self.world_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by tensor_parallel_size ({self.world_size}): choose another size"
            )
        return size // self.world_size


SINGLE = TPGroup()
