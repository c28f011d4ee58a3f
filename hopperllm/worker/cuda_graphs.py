"""CUDA graphs for decode-only steps, captured at start-up at padded batch sizes.

A decode step launches a few hundred small kernels (per layer: norm, QKV GEMV, rotary + cache write,
attention, O GEMV, norm, gate/up GEMV, SiLU-mul, down GEMV); at batch 1 on a 7B model each runs for
microseconds, so launch overhead would rival the work. A graph replays them with one launch.
Padding rows use slot -1 (no cache write) and seq_len 0 (attention writes zeros).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from hopperllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


# Every batch size up to 8 gets its own graph: a batch replays the smallest graph that holds it, and the
# padding rows are not free (Llama-2-70B FP8, TP=2, 2x H200, batch 6: the graph of 8 took 12.90 ms a step,
# a graph of 6 12.54 ms; ab-tp2-b6-graphs-*-h200x2-v20.json). Larger batches pad less in proportion.
DEFAULT_CAPTURE_SIZES = (
    *range(1, 9),
    *range(12, 25, 4),
    *range(32, 65, 8),
    *range(80, 257, 16),
    *range(288, 513, 32),
)


def capture_sizes(max_num_seqs: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """The batch sizes to capture: `sizes` (default DEFAULT_CAPTURE_SIZES) up to max_num_seqs, sorted and
    deduplicated; the smallest one when none is that small."""
    sizes = sorted(set(DEFAULT_CAPTURE_SIZES if sizes is None else sizes))
    return [s for s in sizes if s <= max(max_num_seqs, 1)] or sizes[:1]


class DecodeGraphRunner:
    def __init__(self, runner, sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        mb = runner.max_blocks_per_seq
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(self.max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_bs, mb, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_splits: dict[int, int] = {}
        self.capture_time_s = 0.0

    def _meta(self, bs: int) -> AttentionMetadata:
        from hopperllm.kernels.paged_attention import choose_num_splits

        if bs not in self.num_splits:
            self.num_splits[bs] = choose_num_splits(
                bs,
                self.runner.num_kv_heads,
                self.runner.config.scheduler_config.max_model_len,
                self.runner.device,
            )
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.runner.config.scheduler_config.max_model_len,
            decode_only=True,
            num_splits=self.num_splits[bs],
        )

    @torch.inference_mode()
    def capture(self, show_progress: bool = True) -> None:
        t0 = time.perf_counter()
        model, kv = self.runner.model, self.runner.kv_caches
        pool = None
        for bs in tqdm(
            sorted(self.sizes, reverse=True),
            desc="Capturing CUDA graphs",
            disable=not show_progress,
            leave=False,
        ):
            meta = self._meta(bs)
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                model(self.input_ids[:bs], self.positions[:bs], kv, meta)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = model(self.input_ids[:bs], self.positions[:bs], kv, meta)
            if pool is None:
                pool = g.pool()
            self.graphs[bs] = g
            self.outputs[bs] = out
        torch.cuda.synchronize()
        self.capture_time_s = time.perf_counter() - t0
        logger.info("captured %d decode graphs in %.1f s", len(self.graphs), self.capture_time_s)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.decode_only and meta.num_seqs <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        nb = meta.block_tables.shape[1]
        self.block_tables[:n, :nb].copy_(meta.block_tables, non_blocking=True)
        if n < bs:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


def capture_decode_graphs(runner, show_progress: bool = True) -> DecodeGraphRunner:
    sizes = capture_sizes(runner.config.scheduler_config.max_num_seqs, runner.config.cuda_graph_sizes)
    gr = DecodeGraphRunner(runner, sizes)
    gr.capture(show_progress=show_progress)
    return gr
