"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hopperllm.distributed.parallel_state import SINGLE, TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype, tp: TPGroup = SINGLE):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.padded_vocab_size = -(-vocab_size // tp.world_size) * tp.world_size
        self.local_vocab = self.padded_vocab_size // tp.world_size
        self.vocab_start = tp.rank * self.local_vocab
        self.weight = nn.Parameter(
            torch.empty(self.local_vocab, hidden_size, dtype=params_dtype), requires_grad=False
        )

    def load_shard(self, kind: str, loaded: torch.Tensor, shard: int = 0) -> None:
        if kind != "weight":
            raise ValueError(f"embedding has no {kind!r}")
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"embedding shape {tuple(loaded.shape)} != config ({self.vocab_size}, {self.weight.shape[1]})"
            )
        end = min(self.vocab_start + self.local_vocab, self.vocab_size)
        n = max(0, end - self.vocab_start)
        self.weight.data.zero_()
        self.weight.data[:n].copy_(loaded[self.vocab_start : end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out = out.masked_fill(mask[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if (
            hidden.is_cuda
            and hidden.dim() == 2
            and hidden.shape[0] == 1
            and hidden.dtype == self.weight.dtype
        ):
            from hopperllm.kernels.gemv import gemv

            logits = gemv(hidden, self.weight)  # batch-1 decode: cuBLAS reaches ~60% of bandwidth at M = 1
        else:
            logits = F.linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
