"""CUDA graphs for decode-only steps, captured at start-up at padded batch sizes.

A decode step launches a few hundred small kernels (per layer: norm, QKV GEMV, rotary + cache write,
attention, O GEMV, norm, gate/up GEMV, SiLU-mul, down GEMV); at batch 1 on a 7B model each runs for
microseconds, so launch overhead would rival the work. A graph replays them with one launch.
Padding rows use slot -1 (no cache write) and seq_len 0 (attention writes zeros).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from tqdm.auto import tqdm

from hopperllm.kernels.launch import cdiv
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


# Graphs up to this batch also run the LM head, writing float32 logits into one buffer the sampler reads: the
# head's launch, its input gather and the float32 conversion leave the step's tail (~10 us of a 3 ms step at
# batch 1). Larger batches take 5 ms and more a step, where that matters less than the buffer's size (a 128k
# vocabulary: 0.5 MB a row).
HEAD_IN_GRAPH_MAX_BS = 64


def _round_up(x: int, m: int) -> int:
    return cdiv(x, m) * m


@torch.inference_mode()
def _capture_graphs(sizes, desc: str, show_progress: bool, run) -> tuple[dict, dict, float]:
    """Capture `run(size, warm=False)` for each size, largest first, in one memory pool, after two
    `run(size, warm=True)` calls outside the capture (Triton compiles there). Returns the graphs, their
    outputs and the seconds taken."""
    t0 = time.perf_counter()
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = None
    for size in tqdm(sorted(sizes, reverse=True), desc=desc, disable=not show_progress, leave=False):
        for _ in range(2):
            run(size, True)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outputs[size] = run(size, False)
        if pool is None:
            pool = g.pool()
        graphs[size] = g
    torch.cuda.synchronize()
    return graphs, outputs, time.perf_counter() - t0


class GraphLayout:
    """Where a decode step's inputs live in the graphs' two static device buffers, so that the model runner
    copies a step's host arrays straight into them (one copy each, no device-to-device copies):
    int64 [input_ids | positions | slot_mapping], `stride64` apart, then the step's placeholder fill rows and
    sources (ModelRunner._stage_graph_step); int32 [seq_lens (`stride32`) | block tables, `max_blocks` ints a
    row]. Every part starts 16 bytes aligned."""

    def __init__(self, max_bs: int, max_blocks: int):
        self.max_bs = max_bs
        self.max_blocks = max_blocks
        self.stride64 = _round_up(max_bs, 2)
        self.stride32 = _round_up(max_bs, 4)
        self.size64 = 5 * self.stride64  # the fills take at most 2 x max_bs
        self.size32 = self.stride32 + max_bs * max_blocks


class DecodeGraphRunner:
    def __init__(self, runner, sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        mb = runner.max_blocks_per_seq
        self.layout = lay = GraphLayout(self.max_bs, mb)
        self.static64 = torch.zeros(lay.size64, dtype=torch.long, device=dev)
        self.static32 = torch.zeros(lay.size32, dtype=torch.int32, device=dev)
        s = lay.stride64
        self.input_ids = self.static64[: self.max_bs]
        self.positions = self.static64[s : s + self.max_bs]
        self.slot_mapping = self.static64[2 * s : 2 * s + self.max_bs]
        self.slot_mapping.fill_(-1)
        self.seq_lens = self.static32[: self.max_bs]
        self.block_tables = self.static32[lay.stride32 :].view(self.max_bs, mb)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_splits: dict[int, int] = {}
        self.capture_time_s = 0.0
        # the LM head inside the graph (one GPU: a tensor-parallel head all-gathers its shards, kept eager); only
        # staged steps read its logits, so HOPPERLLM_GRAPH_STAGING=0 leaves it out of the graphs too
        from hopperllm.worker.model_runner import GRAPH_STAGING

        self.head_max_bs = HEAD_IN_GRAPH_MAX_BS if runner.tp.world_size == 1 and GRAPH_STAGING else 0
        self.logits: torch.Tensor | None = None  # float32 [head batches, vocab]

    def padded_size(self, n: int) -> int:
        """The batch of the graph that runs n sequences."""
        return next(s for s in self.sizes if s >= n)

    def has_head(self, bs: int) -> bool:
        return bs <= self.head_max_bs

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

    def capture(self, show_progress: bool = True) -> None:
        model, kv = self.runner.model, self.runner.kv_caches

        def run(bs: int, warm: bool) -> torch.Tensor:
            out = model(self.input_ids[:bs], self.positions[:bs], kv, self._meta(bs))
            if self.has_head(bs):
                logits = model.compute_logits(out)
                if warm and self.logits is None:  # outside the capture; the largest head batch comes first
                    self.logits = torch.empty(bs, logits.shape[-1], dtype=torch.float32, device=out.device)
                elif not warm:
                    self.logits[:bs].copy_(logits)
            return out

        self.graphs, self.outputs, self.capture_time_s = _capture_graphs(
            self.sizes, "Capturing CUDA graphs", show_progress, run
        )
        logger.info("captured %d decode graphs in %.1f s", len(self.graphs), self.capture_time_s)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.decode_only and meta.num_seqs <= self.max_bs

    def replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the graph for n sequences on the inputs already in the static buffers (the model runner
        copied them there in `layout`, padding rows included): (hidden [n, H], float32 logits [n, V] where
        the graph runs the LM head, else None)."""
        bs = self.padded_size(n)
        self.graphs[bs].replay()
        return self.outputs[bs][:n], self.logits[:n] if self.has_head(bs) else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Copy a step's inputs into the static buffers, replay, return the hidden states [n, H]."""
        n = meta.num_seqs
        bs = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        nb = meta.block_tables.shape[1]
        self.block_tables[:n, :nb].copy_(meta.block_tables, non_blocking=True)
        if n < bs:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        return self.replay(n)[0]


def capture_decode_graphs(runner, show_progress: bool = True) -> DecodeGraphRunner:
    sizes = capture_sizes(runner.config.scheduler_config.max_num_seqs, runner.config.cuda_graph_sizes)
    gr = DecodeGraphRunner(runner, sizes)
    gr.capture(show_progress=show_progress)
    return gr


# Token counts of the single-sequence prefill graphs: a prompt (or a chunk of one) of n tokens runs in the
# smallest graph of at least n, the rest of its rows a padding sequence: fewer than 128 rows or at most 25% of
# n (2049 tokens in the 2560-row graph: ~7 ms more GPU work on the 7B, against the ~20 ms of enqueueing the
# graph saves). The graphs share one memory pool, so more of them cost capture time only.
PREFILL_GRAPH_TOKENS = (*range(128, 1024, 128), *range(1024, 2048, 256), *range(2048, 4097, 512))


class _SizedGraphs:
    """Graphs captured at `sizes` rows (ascending); a step replays the smallest that holds it."""

    sizes: list[int]

    def bucket(self, n: int) -> int | None:
        """The row count of the graph that runs an n-row step, or None (more than the largest)."""
        return next((s for s in self.sizes if s >= n), None)


class PrefillGraphRunner(_SizedGraphs):
    """CUDA graphs for steps that prefill one sequence: its whole prompt, a chunk of it, or the part a
    prefix-cache hit left; the batch-1 time to first token. Eagerly such a step enqueues ~350 launches
    (Llama-2-7B), whose Python costs the host 20-42 ms against ~26 ms of GPU work for 2048 tokens on an
    H200 (perf-notes v26): the host, not the GPU, then sets the time to first token. A graph replays them
    in one launch.

    A graph of T tokens holds two sequences: the step's (n tokens, its context and block table) and a
    padding sequence of the other T - n rows (its own context only, slot -1: it writes no cache; its rows'
    outputs are dropped). The model's kernels treat rows independently but for attention, which never
    mixes sequences, so the step's rows compute what they compute eagerly. Static buffers:
    int64 [input_ids | positions | slot_mapping], `stride64` apart, then the placeholder fill rows and
    sources; int32 [cu_seqlens_q (3) | keep row (1) | seq_lens (2) | 2 unused | block tables, 2 rows of
    `max_blocks`]. The keep row (the step's last, n - 1) is the one row the last layer's o_proj and MLP run
    on (LlamaModel's keep_rows; with `keep_last`): a graph returns hidden [1, H]."""

    desc = "Capturing prefill graphs"

    def __init__(self, runner, sizes: list[int], keep_last: bool = True):
        self.runner = runner
        self.keep_last = keep_last
        self.sizes = sorted(sizes)
        self.max_tokens = self.sizes[-1]
        dev = runner.device
        mb = self.max_blocks = runner.max_blocks_per_seq
        s = self.stride64 = _round_up(self.max_tokens, 2)
        self.static64 = torch.zeros(3 * s + 4, dtype=torch.long, device=dev)
        self.static32 = torch.zeros(8 + 2 * mb, dtype=torch.int32, device=dev)
        self.input_ids = self.static64[: self.max_tokens]
        self.positions = self.static64[s : s + self.max_tokens]
        self.slot_mapping = self.static64[2 * s : 2 * s + self.max_tokens]
        self.cu_seqlens_q = self.static32[:3]
        self.keep_row = self.static32[3:4]
        self.seq_lens = self.static32[4:6]
        self.block_tables = self.static32[8:].view(2, mb)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_time_s = 0.0

    def _meta(self, tokens: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q,
            seq_lens=self.seq_lens,
            slot_mapping=self.slot_mapping[:tokens],
            block_tables=self.block_tables,
            max_seqlen_q=tokens,
            max_seqlen_k=self.runner.config.scheduler_config.max_model_len,
            decode_only=False,
        )

    def _dummy_inputs(self, tokens: int) -> None:
        """One sequence of `tokens` tokens without context, writing nothing (slot -1)."""
        self.input_ids.zero_()
        self.positions[:tokens].copy_(torch.arange(tokens, device=self.positions.device))  # < max_model_len
        self.slot_mapping.fill_(-1)
        self.cu_seqlens_q.copy_(torch.tensor([0, tokens, tokens], dtype=torch.int32))
        self.keep_row.fill_(tokens - 1)
        self.seq_lens.copy_(torch.tensor([tokens, 0], dtype=torch.int32))
        self.block_tables.zero_()

    def capture(self, show_progress: bool = True) -> None:
        model, kv = self.runner.model, self.runner.kv_caches

        def run(tokens: int, warm: bool) -> torch.Tensor:
            if warm:
                self._dummy_inputs(tokens)
            keep = self.keep_row if self.keep_last else None
            return model(
                self.input_ids[:tokens], self.positions[:tokens], kv, self._meta(tokens), keep_rows=keep
            )

        self.graphs, self.outputs, self.capture_time_s = _capture_graphs(
            self.sizes, self.desc, show_progress, run
        )
        logger.info("%s: %d in %.1f s", self.desc, len(self.graphs), self.capture_time_s)

    def replay(self, tokens: int, n: int) -> torch.Tensor:
        """Run the graph of `tokens` tokens on the inputs the model runner staged for an n-token step: the
        hidden state of its last row [1, H]."""
        self.graphs[tokens].replay()
        out = self.outputs[tokens]
        return out if self.keep_last else out[n - 1 : n]


class RowGraphRunner(_SizedGraphs):
    """CUDA graphs for steps whose sequences each compute a few rows: speculative decoding's verify steps (each
    sequence's last token and its drafts) and a draft model's first step of a round (its catch-up token with
    the last). Eagerly such a step is the host's ~350 launches for a few rows (Llama-2-7B FP8: 27 ms a step
    on an H200 against a 3.4 ms decode graph).

    Every row is a decode row of its own: its token, position and cache slot, its causal context length and
    its sequence's block table. The model writes every row's K / V first (rotary + cache write), then
    attention runs each row through flash-decoding (AttentionMetadata.row_seq_lens), so a sequence's rows
    see each other's keys; other kernels treat rows independently. A graph of T rows runs any step of at
    most T rows and at most `max_q` rows a sequence; padding rows write no cache (slot -1) and attend to one
    key. Static buffers: int64 [input_ids | positions | slot_mapping | sampled rows | placeholder fill rows |
    their sources], `stride64` apart; int32 [row context lengths (`stride32`) | row groups (`stride32g`: a
    sequence's rows, then a group a padding row, then empty groups; T + 1 boundaries) | block tables, a row
    each]. With HOPPERLLM_VERIFY_ROW_GROUPS=1 attention reads a group's keys once for all its rows (one
    program a group, kv head and slice) instead of once a row.

    `eager=True` (tests on the CPU): no graphs, `replay` runs the model on the staged buffers."""

    desc = "Capturing verify graphs"

    def __init__(self, runner, sizes: list[int], max_q: int, eager: bool = False):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_tokens = self.sizes[-1]
        self.max_q = max_q
        self.eager = eager
        dev = runner.device
        mb = self.max_blocks = runner.max_blocks_per_seq
        s = self.stride64 = _round_up(self.max_tokens, 2)
        self.static64 = torch.zeros(6 * s, dtype=torch.long, device=dev)
        self.input_ids = self.static64[: self.max_tokens]
        self.positions = self.static64[s : s + self.max_tokens]
        self.slot_mapping = self.static64[2 * s : 2 * s + self.max_tokens]
        self.sample_rows = self.static64[3 * s : 4 * s]
        s32 = self.stride32 = _round_up(self.max_tokens, 4)
        g32 = self.stride32g = _round_up(self.max_tokens + 1, 4)
        self.static32 = torch.zeros(s32 + g32 + self.max_tokens * mb, dtype=torch.int32, device=dev)
        self.row_seq_lens = self.static32[: self.max_tokens]
        self.row_groups = self.static32[s32 : s32 + self.max_tokens + 1]
        self.block_tables = self.static32[s32 + g32 :].view(self.max_tokens, mb)
        self.grouped = os.environ.get("HOPPERLLM_VERIFY_ROW_GROUPS", "0") == "1"
        # (read by the torch backend only, on the CPU: each row a one-query sequence)
        self.cu_seqlens_q = torch.arange(self.max_tokens + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_time_s = 0.0

    def _meta(self, tokens: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: tokens + 1],
            seq_lens=self.row_seq_lens[:tokens],
            slot_mapping=self.slot_mapping[:tokens],
            block_tables=self.block_tables[:tokens],
            max_seqlen_q=1,
            max_seqlen_k=self.runner.config.scheduler_config.max_model_len,
            decode_only=False,
            row_seq_lens=self.row_seq_lens[:tokens],
            row_groups=self.row_groups[: tokens + 1] if self.grouped else None,
            row_group_max=self.max_q,
        )

    def _run(self, tokens: int) -> torch.Tensor:
        r = self.runner
        return r.model(self.input_ids[:tokens], self.positions[:tokens], r.kv_caches, self._meta(tokens))

    def capture(self, show_progress: bool = True) -> None:
        def run(tokens: int, warm: bool) -> torch.Tensor:
            if warm:  # rows of no context that write nothing, a group each
                self.static64.zero_()
                self.slot_mapping.fill_(-1)
                self.row_seq_lens.fill_(1)
                self.row_groups.copy_(torch.arange(self.max_tokens + 1, device=self.row_groups.device))
                self.block_tables.zero_()
            return self._run(tokens)

        self.graphs, self.outputs, self.capture_time_s = _capture_graphs(
            self.sizes, self.desc, show_progress, run
        )
        logger.info("%s: %d in %.1f s", self.desc, len(self.graphs), self.capture_time_s)

    def replay(self, tokens: int, n: int, num_samples: int) -> torch.Tensor:
        """Run the graph of `tokens` rows on an n-row step staged in its buffers: the hidden states of its
        sampled rows (all n in order, or the staged `sample_rows`)."""
        if self.eager:
            out = self._run(tokens)
        else:
            self.graphs[tokens].replay()
            out = self.outputs[tokens]
        if num_samples == n:
            return out[:n]
        return out.index_select(0, self.sample_rows[:num_samples])


class DraftChain:
    """A draft model's greedy decode steps of a speculative round, chained on the device: step j feeds each
    row the token step j - 1 chose (step 0: the row's staged `first` token) and writes the argmax of its
    logits to `tokens[j]`. Each step reads its own plane of the static buffers (positions, cache slots,
    context lengths: the host stages every step's in one copy), so the steps need no copies between them,
    and a CUDA graph of all of them (one for the steps from 0, one from 1, at each captured batch size) makes
    the draft's proposal one launch where a step of `ModelRunner.launch` costs ~0.3 ms of host time.

    Static buffers: int64 [first tokens (`stride`) | per step: positions, slots (`stride` each)]; int32 [per
    step: context lengths (`stride`) | block tables, `max_blocks` a row]; tokens int64 [steps, `stride`].
    Padding rows have length 0 and slot -1. Batches over the largest graph (all of them on the CPU, with
    enforce_eager, or under tensor parallelism) run the same steps eagerly."""

    desc = "Capturing draft graphs"

    def __init__(self, runner, num_steps: int, max_rows: int, pad_sizes: list[int], graph_max_bs: int = 0):
        from hopperllm.kernels.paged_attention import choose_num_splits

        self.runner = runner
        self.num_steps = k = num_steps
        # a batch runs padded to the next of `pad_sizes` (the decode graphs' sizes: the decode kernels' variants
        # warmed at start-up, no compile while serving), in a graph up to graph_max_bs rows
        self.pad_sizes = sorted(pad_sizes)
        self.sizes = [bs for bs in self.pad_sizes if bs <= graph_max_bs]  # the graphs'
        self.max_rows = max(max_rows, *self.pad_sizes) if self.pad_sizes else max_rows
        dev = runner.device
        mb = self.max_blocks = runner.max_blocks_per_seq
        s = self.stride = _round_up(self.max_rows, 4)
        self.static64 = torch.zeros(s + 2 * k * s, dtype=torch.long, device=dev)
        self.static32 = torch.zeros(k * s + self.max_rows * mb, dtype=torch.int32, device=dev)
        self.first = self.static64[:s]
        self.pos_slot = self.static64[s:].view(k, 2, s)
        self.lens = self.static32[: k * s].view(k, s)
        self.tables = self.static32[k * s :].view(self.max_rows, mb)
        self.tokens = torch.zeros(k, s, dtype=torch.long, device=dev)
        self.cu_seqlens_q = torch.arange(self.max_rows + 1, dtype=torch.int32, device=dev)
        max_len = runner.config.scheduler_config.max_model_len
        self._splits = {bs: choose_num_splits(bs, runner.num_kv_heads, max_len, dev) for bs in self.pad_sizes}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_time_s = 0.0

    def _run(self, rows: int, first_step: int) -> None:
        r = self.runner
        for j in range(first_step, self.num_steps):
            meta = AttentionMetadata(
                cu_seqlens_q=self.cu_seqlens_q[: rows + 1],
                seq_lens=self.lens[j, :rows],
                slot_mapping=self.pos_slot[j, 1, :rows],
                block_tables=self.tables[:rows],
                max_seqlen_q=1,
                max_seqlen_k=r.config.scheduler_config.max_model_len,
                decode_only=True,
                num_splits=self._splits.get(rows),
            )
            src = self.first[:rows] if j == 0 else self.tokens[j - 1, :rows]
            hidden = r.model(src, self.pos_slot[j, 0, :rows], r.kv_caches, meta)
            # (the sampler's greedy rule takes the argmax of float32 logits: the same index)
            torch.argmax(r.model.compute_logits(hidden), dim=-1, out=self.tokens[j, :rows])

    def capture(self, show_progress: bool = True) -> None:
        keys = [(bs, j0) for bs in self.sizes for j0 in range(min(2, self.num_steps))]

        def run(key: tuple[int, int], warm: bool) -> None:
            if warm:  # rows of no context that write nothing
                self.static64.zero_()
                self.pos_slot[:, 1].fill_(-1)
                self.static32.zero_()
            self._run(*key)

        self.graphs, _, self.capture_time_s = _capture_graphs(keys, self.desc, show_progress, run)
        logger.info("%s: %d in %.1f s", self.desc, len(self.graphs), self.capture_time_s)

    def padded(self, n: int) -> int:
        """The rows an n-sequence chain runs (padding rows: length 0, slot -1)."""
        return next((bs for bs in self.pad_sizes if bs >= n), n)

    def replay(self, rows: int, first_step: int) -> None:
        """Run steps first_step.. (0 or 1) over `rows` (`padded`) rows staged in the buffers: the graph of that
        batch, or eagerly where there is none."""
        g = self.graphs.get((rows, first_step))
        if g is not None:
            g.replay()
        else:
            self._run(rows, first_step)


# draft chains up to this many sequences run in CUDA graphs (larger batches, where drafting seldom pays, run
# the chain's steps eagerly)
DRAFT_CHAIN_GRAPH_MAX_BS = 64


def make_draft_chain(runner, num_steps: int, graphs: bool, show_progress: bool = True) -> DraftChain:
    """A draft model's DraftChain for rounds of `num_steps` drafts, with its CUDA graphs at the decode graphs'
    batch sizes up to DRAFT_CHAIN_GRAPH_MAX_BS when `graphs` (out of memory: none, with a warning)."""
    max_rows = runner.config.scheduler_config.max_num_seqs
    if runner.device.type != "cuda":
        return DraftChain(runner, num_steps, max_rows, [])
    pad = capture_sizes(max_rows, runner.config.cuda_graph_sizes)
    if not graphs:
        return DraftChain(runner, num_steps, max_rows, pad)
    chain = DraftChain(runner, num_steps, max_rows, pad, DRAFT_CHAIN_GRAPH_MAX_BS)
    chain = _capture_or_none(chain, show_progress, "draft", "draft")
    return chain if chain is not None else DraftChain(runner, num_steps, max_rows, pad)


# row counts of the verify graphs (up to max_num_seqs x (num_speculative_tokens + 1), at most the last)
ROW_GRAPH_TOKENS = (*range(2, 9), 10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


def row_graph_sizes(max_q: int, max_num_seqs: int) -> list[int]:
    """ROW_GRAPH_TOKENS up to the most rows a step of max_num_seqs sequences of max_q (>= 2) rows can have,
    that count itself included."""
    cap = min(max_num_seqs * max_q, ROW_GRAPH_TOKENS[-1])
    sizes = [s for s in ROW_GRAPH_TOKENS if s <= cap]
    return sizes if sizes[-1] == cap else [*sizes, cap]


def capture_row_graphs(runner, max_q: int, show_progress: bool = True) -> RowGraphRunner | None:
    """The verify graphs of a runner whose steps take up to `max_q` rows a sequence, or None (out of memory:
    such steps then run eagerly, with a warning)."""
    sizes = row_graph_sizes(max_q, runner.config.scheduler_config.max_num_seqs)
    return _capture_or_none(RowGraphRunner(runner, sizes, max_q), show_progress, "verify", "speculative")


def prefill_graph_sizes(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """PREFILL_GRAPH_TOKENS up to what one step can prefill of one sequence: a graph's rows (the padding
    sequence's positions included) stay within max_model_len."""
    return [s for s in PREFILL_GRAPH_TOKENS if s <= min(max_num_batched_tokens, max_model_len)]


def capture_prefill_graphs(runner, show_progress: bool = True) -> PrefillGraphRunner | None:
    """The prefill graphs, or None: no size fits a step, or the GPU ran out of memory capturing them (their
    pool holds the largest graph's activations beside the KV cache, which start-up sized for eager steps
    only; at a high gpu_memory_utilization that may not fit): then prefill steps run eagerly, with a warning."""
    sc = runner.config.scheduler_config
    sizes = prefill_graph_sizes(sc.max_num_batched_tokens, sc.max_model_len)
    if not sizes:
        return None
    from hopperllm.worker.model_runner import KEEP_SAMPLED_ROWS

    return _capture_or_none(
        PrefillGraphRunner(runner, sizes, keep_last=KEEP_SAMPLED_ROWS), show_progress, "prefill", "prefill"
    )


def _capture_or_none(gr, show_progress: bool, name: str, steps: str):
    """`gr` captured, or None when the GPU ran out of memory capturing it (its pool holds the largest graph's
    activations beside the KV cache, which start-up sized for eager steps only; at a high
    gpu_memory_utilization that may not fit): those steps then run eagerly, with a warning."""
    runner = gr.runner
    try:
        gr.capture(show_progress=show_progress)
    except torch.cuda.OutOfMemoryError:
        if runner.tp.world_size > 1:
            # another rank may be inside a warm-up step's all-reduce that this one will never join: fail
            # the start-up (the executor reports it) rather than fall back alone and leave that rank waiting
            raise
        del gr
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        logger.warning(
            "not enough GPU memory for the %s CUDA graphs beside the KV cache: %s steps run eagerly (lower "
            "gpu_memory_utilization to keep them)",
            name,
            steps,
        )
        return None
    return gr
