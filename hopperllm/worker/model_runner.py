"""The model runner: turns a SchedulerOutput into the flat batch, runs the model, samples.

Owns the model, the KV cache tensors, the attention backend, per-request RNGs and (on CUDA) the
decode CUDA graphs. Knows nothing of policy: the scheduler decided what runs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from hopperllm.config import EngineConfig
from hopperllm.distributed.parallel_state import SINGLE, TPGroup
from hopperllm.engine.scheduler import SchedulerOutput
from hopperllm.engine.sequence import Sequence
from hopperllm.layers.attention import AttentionMetadata, get_attention_backend
from hopperllm.layers.sampler import Sampler, SamplingMetadata, to_device
from hopperllm.loader.model_loader import ModelSource, build_model

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn


@dataclass
class ModelRunnerOutput:
    seq_ids: list[str] = field(default_factory=list)  # the sequences that sampled, in order
    token_ids: list[int] = field(default_factory=list)
    # per sampled seq: (chosen token logprob, {token_id: logprob} of the top-k) or None
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    # SamplingParams.prompt_logprobs: seq_id -> (p0, top, chosen): for the prompt tokens at positions p0 + 1,
    # p0 + 2, ..., as predicted from the position before, the top-k {token_id: logprob} and the logprob of
    # the prompt token itself
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]], list[float]]] | None = None


@dataclass
class StepLaunch:
    """A step enqueued on the device whose sampled tokens have not been read back yet."""

    seq_ids: list[str]
    token_ids_dev: torch.Tensor | None = None
    token_ids_host: torch.Tensor | None = None
    logprobs: object = None
    wanted_logprobs: list[int | None] | None = None
    event: torch.cuda.Event | None = None
    # prompt logprobs: [(seq_id, first position, count, k)] and host tensors (chosen [T], top ids / logprobs [T, k])
    prompt_lp_seqs: list[tuple[str, int, int, int]] | None = None
    prompt_lp_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


# Decode steps that a CUDA graph runs copy their inputs straight into the graphs' buffers and take the LM head's
# logits from the graph (`_stage_graph_step`, cuda_graphs.HEAD_IN_GRAPH_MAX_BS); HOPPERLLM_GRAPH_STAGING=0 goes
# back to staging them like any step, then copying them into the graphs' buffers, the head outside the graph.
GRAPH_STAGING = os.environ.get("HOPPERLLM_GRAPH_STAGING", "1") == "1"
# Steps that prefill one sequence replay a CUDA graph (cuda_graphs.PrefillGraphRunner) instead of enqueueing
# ~350 launches from Python (one GPU; not with enforce_eager): the 7B's 2048-token prefill enqueues in 2.2 ms
# instead of 20-37 ms, time to first token 25.6 ms instead of 27.0-27.3 (H200, perf-notes v27).
# HOPPERLLM_PREFILL_GRAPHS=0 turns them off.
PREFILL_GRAPHS = os.environ.get("HOPPERLLM_PREFILL_GRAPHS", "1") == "1"
# HOPPERLLM_PREFILL_GRAPHS_TP=1 captures them with tensor parallelism too, NCCL's prefill-sized all-reduces
# inside (every rank stages the same step into the same graph, so the ranks replay the same collectives).
# Off until measured on several GPUs: the 70B's 80 layers enqueue ~2.5x the 7B's launches, host time that TTFT
# pays where it exceeds the GPU's (TP=8's ~1/8 of the prefill's GEMMs a rank).
PREFILL_GRAPHS_TP = os.environ.get("HOPPERLLM_PREFILL_GRAPHS_TP", "0") == "1"
# Eager steps with rows that sample nothing (prompt tokens before a prompt's last) run the last layer's
# o_proj and MLP on the sampled rows only (LlamaModel's keep_rows): ~1/num_layers of a prefill's GEMM FLOPs,
# which the power-bound throughput run pays in joules. HOPPERLLM_KEEP_SAMPLED_ROWS=0 runs every row (A/B).
KEEP_SAMPLED_ROWS = os.environ.get("HOPPERLLM_KEEP_SAMPLED_ROWS", "1") == "1"


class _BlockTableRows:
    """The block tables of the sequences the runner has seen, as rows of one persistent int32 array (`width`
    ids a row, zeros past a table's end). A step gathers its rows in one numpy operation; a row takes only the
    ids appended since the last step (a `BlockTable` whose `version` is unchanged), where converting every
    table from its list each step cost ~2.2 ms for 490 decodes on a CPU. Rows are freed with their sequences
    (ModelRunner.release)."""

    def __init__(self, width: int, capacity: int = 16):
        self.width = width
        self.rows = np.zeros((capacity, width), dtype=np.int32)
        self.entry: dict[str, list] = {}  # seq_id -> [row, ids copied, the table's version]
        self.free = list(range(capacity - 1, -1, -1))

    def row(self, seq: Sequence) -> int:
        """The row holding `seq`'s block table as it is now."""
        bt = seq.block_table
        version = getattr(bt, "version", None)  # a plain list (logits_for_tokens): copied whole every time
        e = self.entry.get(seq.seq_id)
        if e is None:
            if not self.free:
                cap = len(self.rows)
                self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
                self.free = list(range(2 * cap - 1, cap - 1, -1))
            e = self.entry[seq.seq_id] = [self.free.pop(), 0, version]
        r, n, v = e
        m = len(bt)
        if version is None or v != version or n > m:
            self.rows[r, :m] = bt
            if n > m:
                self.rows[r, m:n] = 0
            e[1], e[2] = m, version
        elif n < m:
            self.rows[r, n:m] = bt[n:]
            e[1] = m
        return r

    def gather(self, seqs: list[Sequence], width: int) -> np.ndarray:
        """[len(seqs), width] block tables (a copy)."""
        idx = np.fromiter((self.row(s) for s in seqs), dtype=np.intp, count=len(seqs))
        return self.rows[idx, :width]

    def release(self, seq_ids) -> None:
        for s in seq_ids:
            e = self.entry.pop(s, None)
            if e is not None:
                self.rows[e[0], : e[1]] = 0
                self.free.append(e[0])


class _StepRows(NamedTuple):
    """A step's host lists, as _prepare builds them, for the graph staging functions."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    q_lens: list[int]
    seqs: list[Sequence]  # the scheduled sequences, in row order (their block tables: _BlockTableRows)
    sample_seqs: list[Sequence]
    fill_pos: list[int]
    fill_src: list[int]


def _staged_int64(
    rows: _StepRows, stride: int, total: int, pad_positions: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """A graph's int64 buffer for the step's rows: [input_ids | positions | slot_mapping], `stride` apart, rows
    up to `total` padding (slot -1; positions 0, 1, ... with `pad_positions`, else 0), then the placeholder
    fill rows and sources; returns it and the fill parts' offsets."""
    n, s = len(rows.input_ids), stride
    nf = -(-len(rows.fill_pos) // 2) * 2  # 16-byte aligned parts
    i64 = np.zeros(3 * s + 2 * nf, dtype=np.int64)
    i64[:n] = rows.input_ids
    i64[s : s + n] = rows.positions
    if pad_positions:
        i64[s + n : s + total] = np.arange(total - n)
    i64[2 * s : 2 * s + n] = rows.slots
    i64[2 * s + n : 2 * s + total] = -1  # padding rows write no cache
    i64[3 * s : 3 * s + len(rows.fill_pos)] = rows.fill_pos
    i64[3 * s + nf : 3 * s + nf + len(rows.fill_src)] = rows.fill_src
    return i64, (3 * s, 3 * s + nf)


def _aligned_offsets(lengths: list[int], multiple: int) -> list[int]:
    """Start offsets of parts laid end to end, each rounded up to `multiple` elements; the last entry is
    the total length."""
    out, pos = [], 0
    for n in lengths:
        out.append(pos)
        pos += -(-n // multiple) * multiple
    return out + [pos]


def _leading_ones(q_lens: list[int]) -> int:
    """How many sequences at the front of the step have one query (decodes): AttentionMetadata.num_decodes."""
    n = 0
    while n < len(q_lens) and q_lens[n] == 1:
        n += 1
    return n


def kv_cache_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if cache_dtype.startswith("fp8"):
        return FP8_DTYPE
    if cache_dtype == "auto":
        return model_dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cache_dtype]


def kv_block_bytes(config: EngineConfig, tp_size: int = 1) -> int:
    """Bytes of one KV-cache block on one rank (its share of the KV heads), over all layers."""
    elem = torch.empty(
        (), dtype=kv_cache_dtype(config.cache_config.kv_cache_dtype, config.dtype)
    ).element_size()
    return config.cache_config.block_size * (config.model_config.kv_elems_per_token // tp_size) * elem


class ModelRunner:
    def __init__(
        self, config: EngineConfig, src: ModelSource, tp: TPGroup = SINGLE, show_progress: bool = True
    ):
        self.config = config
        self.device = torch.device(
            config.device if config.device != "cuda" else f"cuda:{torch.cuda.current_device()}"
        )
        self.tp = tp
        mc = config.model_config
        t0 = time.perf_counter()
        self.model = build_model(
            src,
            mc,
            config.dtype,
            config.quantization,
            self.device,
            tp,
            max_model_len=config.scheduler_config.max_model_len,
            seed=config.seed,
            show_progress=show_progress,
        )
        self.load_time_s = time.perf_counter() - t0
        self.vocab_size = mc.vocab_size
        self.block_size = config.cache_config.block_size
        self.kv_dtype = kv_cache_dtype(config.cache_config.kv_cache_dtype, config.dtype)
        self.num_kv_heads = mc.num_key_value_heads // tp.world_size
        self.head_dim = mc.head_dim
        backend = get_attention_backend("triton" if self.device.type == "cuda" else "torch")
        for attn in self.model.attention_layers():
            attn.backend = backend
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        self.max_blocks_per_seq = -(-config.scheduler_config.max_model_len // self.block_size)
        self.graph_runner = None  # CUDA graphs for decode, set up by capture_cuda_graphs()
        self.prefill_graphs = None  # CUDA graphs for one sequence's prefill (PREFILL_GRAPHS)
        # CUDA graphs for steps of a few rows a sequence (speculative decoding: cuda_graphs.RowGraphRunner)
        self.row_graphs = None
        # _prepare staged this step for the prefill / row graph of so many tokens
        self._prefill_tokens: int | None = None
        self._row_tokens: int | None = None
        # pinned host staging buffers for _prepare's two copies per step (CUDA only), used in turn
        self._staging: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event] | None] = [None, None]
        self._staging_slot = 0
        self._prompt_lp = None  # _prepare's prompt-logprob rows for launch
        self._bt_rows = _BlockTableRows(self.max_blocks_per_seq)
        self._staged = False  # _prepare put a decode step's inputs into the graphs' buffers
        self.draft_chain = None  # a draft model's: its rounds' decode steps (cuda_graphs.DraftChain)

    # -- KV cache ---------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return kv_block_bytes(self.config, self.tp.world_size)

    def determine_num_kv_blocks(self, extra_bytes_per_block: int = 0) -> int:
        """`extra_bytes_per_block`: what else each block costs (a draft model's cache over the same blocks)."""
        cc = self.config.cache_config
        if cc.num_kv_blocks is not None:
            return cc.num_kv_blocks
        per_block = self.bytes_per_block() + extra_bytes_per_block
        if self.device.type != "cuda":
            # CPU: room for 16k tokens, at most 2 GiB
            want = -(-16384 // self.block_size)
            return max(1, min(want, (2 << 30) // per_block))
        return self._profile_num_kv_blocks(per_block)

    @torch.inference_mode()
    def _profile_num_kv_blocks(self, per_block: int) -> int:
        """Run the largest step the scheduler may send with a scratch cache, then give the KV cache
        whatever gpu_memory_utilization leaves beside the weights (a draft model's included: loaded before
        this runs) and that step's peak."""
        sc = self.config.scheduler_config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = min(sc.max_num_batched_tokens, sc.max_model_len * sc.max_num_seqs)
        scratch_blocks = -(-num_tokens // self.block_size) + 1
        self.kv_caches = self._alloc_kv(scratch_blocks)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device) % sc.max_model_len
        nseq = -(-num_tokens // sc.max_model_len)
        lens = [min(sc.max_model_len, num_tokens - i * sc.max_model_len) for i in range(nseq)]
        meta = self._dummy_meta(lens, scratch_blocks)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        self.model.compute_logits(hidden[-min(sc.max_num_seqs, num_tokens) :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        scratch = sum(t.numel() * t.element_size() for t in self.kv_caches)
        self.kv_caches = []
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        # memory other processes hold is outside our budget too
        others = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache_config.gpu_memory_utilization - (peak - scratch) - max(others, 0)
        n = int(budget // per_block)
        if n < self.max_blocks_per_seq // 4 or n < 1:
            raise ValueError(
                f"the model does not leave room for a KV cache: weights and activations take "
                f"{(peak - scratch) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB at gpu_memory_utilization "
                f"{self.config.cache_config.gpu_memory_utilization}; {n} blocks of {self.block_size} tokens fit. "
                "Lower max_model_len or max_num_batched_tokens, quantize (fp8), or add GPUs"
            )
        return n

    def _dummy_meta(self, lens: list[int], num_blocks: int) -> AttentionMetadata:
        bs = self.block_size
        max_blocks = max(-(-x // bs) for x in lens)
        tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
        slots = []
        nxt = 0
        for i, n in enumerate(lens):
            nb = -(-n // bs)
            tables[i, :nb] = torch.arange(nxt, nxt + nb) % num_blocks
            slots += [int(tables[i, j // bs]) * bs + j % bs for j in range(n)]
            nxt += nb
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        d = self.device
        return AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=d),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=d),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=d),
            block_tables=tables.to(d),
            max_seqlen_q=max(lens),
            max_seqlen_k=max(lens),
            decode_only=False,
            query_lens_cpu=lens,
            seq_lens_cpu=lens,
        )

    def _alloc_kv(self, num_blocks: int) -> list[torch.Tensor]:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            for _ in range(self.config.model_config.num_hidden_layers)
        ]

    def init_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks
        self.kv_caches = self._alloc_kv(num_blocks)

    def warm_decode_kernels(self, largest_graph: int | None) -> list[tuple[int, bool, bool, bool]]:
        """Compile now the decode-attention variants that steps outside the CUDA graphs launch, so that none
        compiles while serving (each ~1 s with an empty Triton cache; Llama-3-8B, 300 x 2048/128 on an H200:
        five compiles inside the run, 2,045 output tok/s against 2,989 with a warm cache):
        - steps mixing decodes with prefills: flash-decoding without the quantized output (the prefill rows'
          output is quantized later, with them) at every split count `choose_num_splits` can return, with
          PDL, and without it when more decodes than PDL_MAX_ROWS can share a step;
        - decode-only steps larger than the largest graph (`largest_graph`; None: no graphs, every decode-only
          step): the model's decode launch (quantized output or not, rotary inside for the layers that fuse
          it) at the split counts and PDL settings those batches get (max_num_seqs 1024 on an H200: two
          variants compiled inside a throughput run before this covered them).
        The graphs' own variants compile when they are captured. Returns the (splits, quant_out, rotary, pdl)
        variants launched."""
        if self.device.type != "cuda" or not self.kv_caches:
            return []
        from hopperllm.kernels.paged_attention import compile_decode_variants

        attn = self.model.attention_layers()[0]
        cache = self.kv_caches[0]
        sc = self.config.scheduler_config
        rotary = getattr(attn.backend, "fuses_decode_rotary", lambda layer: False)(attn)
        variants = decode_warm_variants(
            sc.max_num_seqs, largest_graph, self.num_kv_heads, sc.max_model_len, self.device, rotary
        )
        # the scales and dtypes the attention layers pass (AttentionBackend._mixed, the decode launch)
        for n, quant, fused_rotary, pdl in variants:
            compile_decode_variants(
                attn.num_heads, cache[0], cache[1], attn.k_scale, attn.v_scale, attn.scale, self.config.dtype,
                self.max_blocks_per_seq, [n], quant_out=quant,
                cos_sin_cache=attn.cos_sin_cache if fused_rotary else None, use_pdl=pdl,
            )  # fmt: skip
        torch.cuda.synchronize(self.device)
        return variants

    # -- one step ---------------------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput, prev_rows: dict[str, int] | None = None):
        """Host lists -> device tensors. `prev_rows` (seq_id -> row of the in-flight step's samples) lets
        PLACEHOLDER tokens be filled on the device: returns their flat positions and source rows too."""
        bs = self.block_size
        fill_pos: list[int] = []
        fill_src: list[int] = []
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        q_lens: list[int] = []
        sample_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        sample_trim: list[int] = []  # per sample row: the drafts after its position (not its history)
        # SamplingParams.prompt_logprobs: the flat rows whose logits predict a prompt token, and those tokens
        lp_rows: list[int] = []
        lp_targets: list[int] = []
        lp_seqs: list[tuple[str, int, int, int]] = []
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            bt = seq.block_table
            if n == 1:  # a decode (most rows of a large batch): no slices, ranges or comprehensions
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(bt[start // bs] * bs + start % bs)
            else:
                input_ids += seq.token_ids[start:end]
                positions += range(start, end)
                slots += [bt[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + n)
            q_lens.append(n)
            seq_lens.append(end)
            if end == seq.num_tokens:  # and at each draft's position (speculative decoding)
                sample_idx += range(cu[-1] - 1 - item.num_drafts, cu[-1])
                sample_seqs += [seq] * (item.num_drafts + 1)
                sample_trim += range(item.num_drafts, -1, -1)
            k = seq.sampling_params.prompt_logprobs
            stop = min(end, seq.num_prompt_tokens - 1)  # position p predicts prompt token p + 1
            if k is not None and start < stop:
                lp_seqs.append((seq.seq_id, start, stop - start, k))
                lp_rows += range(cu[-2], cu[-2] + stop - start)
                lp_targets += seq.token_ids[start + 1 : stop + 1]
            if seq.num_placeholders and prev_rows and seq.seq_id in prev_rows:
                pos = seq.num_tokens - 1  # a placeholder is always the last token
                if start <= pos < end:
                    fill_pos.append(cu[-2] + pos - start)
                    fill_src.append(prev_rows[seq.seq_id])
        seqs = [item.seq for item in sched.scheduled]
        nseq = len(seqs)
        pg = self.prefill_graphs
        self._prefill_tokens = None
        self._row_tokens = None
        self._staged = False
        rows = _StepRows(input_ids, positions, slots, seq_lens, q_lens, seqs, sample_seqs, fill_pos, fill_src)
        if pg is not None and nseq == 1 and q_lens[0] > 1 and len(sample_idx) <= 1 and not lp_rows:
            tokens = pg.bucket(q_lens[0])
            if tokens is not None:
                self._prefill_tokens = tokens
                return self._stage_prefill_graph(pg, tokens, rows)
        rg = self.row_graphs
        if rg is not None and sample_idx and not lp_rows and 1 < max(q_lens) <= rg.max_q:
            # each sequence's token and drafts (or a draft model's catch-up token and its last)
            tokens = rg.bucket(len(input_ids))
            if tokens is not None:
                self._row_tokens = tokens
                staged = self._stage_row_graph(rg, tokens, rows, sample_idx)
                self._sample_trim = sample_trim if any(sample_trim) else None
                return staged
        gr = self.graph_runner
        # (a one-token prompt chunk that does not end its prompt samples nothing: then the rows and the
        # samples differ and the step takes the generic path)
        self._staged = (
            GRAPH_STAGING
            and gr is not None
            and max(q_lens) == 1
            and nseq <= gr.max_bs
            and len(sample_seqs) == nseq
            and not lp_rows
        )
        if self._staged:
            return self._stage_graph_step(gr, rows)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        table = self._bt_rows.gather(seqs, max_blocks)
        # Two host buffers (int64, int32), each sent to the device in one copy from pinned memory. Every
        # part starts on a 16-byte boundary: Triton specializes kernels on pointer alignment, and parts at
        # offsets that depend on the batch would compile new kernel variants (~1 s each) while serving.
        parts64 = (input_ids, positions, slots, sample_idx, fill_pos, fill_src, lp_rows, lp_targets)
        o = _aligned_offsets([len(v) for v in parts64], 2)
        i64 = np.zeros(o[-1], dtype=np.int64)
        for v, a in zip(parts64, o, strict=False):
            i64[a : a + len(v)] = v
        parts32 = (cu, seq_lens, table.ravel())
        o32 = _aligned_offsets([len(v) for v in parts32], 4)
        i32 = np.zeros(o32[-1], dtype=np.int32)
        for v, a in zip(parts32, o32, strict=False):
            i32[a : a + len(v)] = v
        d64, d32 = self._to_device(i64, i32)
        o = [(a, a + len(v)) for v, a in zip(parts64, o, strict=False)]
        meta = AttentionMetadata(
            cu_seqlens_q=d32[o32[0] : o32[0] + nseq + 1],
            seq_lens=d32[o32[1] : o32[1] + nseq],
            slot_mapping=d64[o[2][0] : o[2][1]],
            block_tables=d32[o32[2] : o32[2] + nseq * max_blocks].view(nseq, max_blocks),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(seq_lens),
            decode_only=max(q_lens) == 1,
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=_leading_ones(q_lens),
        )
        fill = (d64[o[4][0] : o[4][1]], d64[o[5][0] : o[5][1]]) if fill_pos else None
        self._prompt_lp = (d64[o[6][0] : o[6][1]], d64[o[7][0] : o[7][1]], lp_seqs) if lp_seqs else None
        self._sample_trim = sample_trim if any(sample_trim) else None
        return d64[o[0][0] : o[0][1]], d64[o[1][0] : o[1][1]], meta, d64[o[3][0] : o[3][1]], sample_seqs, fill

    def _stage_graph_step(self, gr, rows: _StepRows):
        """_prepare for a decode step that a CUDA graph runs: the host arrays in the graphs' static layout
        (`GraphLayout`), padding rows up to the graph's batch included, copied straight into the graphs'
        buffers (two copies; no device-to-device copies, no fills). Every row samples, in order."""
        lay = gr.layout
        n = len(rows.seqs)
        i64, fill_at = _staged_int64(rows, lay.stride64, gr.padded_size(n), pad_positions=False)
        i32 = np.zeros(lay.stride32 + n * lay.max_blocks, dtype=np.int32)  # padding rows: seq_len 0
        i32[:n] = rows.seq_lens
        i32[lay.stride32 :].reshape(n, lay.max_blocks)[:] = self._bt_rows.gather(rows.seqs, lay.max_blocks)
        d64, _ = self._to_device(i64, i32, gr.static64, gr.static32)
        meta = AttentionMetadata(
            cu_seqlens_q=gr.cu_seqlens_q[: n + 1],
            seq_lens=gr.seq_lens[:n],
            slot_mapping=gr.slot_mapping[:n],
            block_tables=gr.block_tables[:n],
            max_seqlen_q=1,
            max_seqlen_k=max(rows.seq_lens),
            decode_only=True,
            query_lens_cpu=rows.q_lens,
            seq_lens_cpu=rows.seq_lens,
            num_decodes=n,
        )
        return self._staged_result(gr.input_ids[:n], gr.positions[:n], meta, rows, d64, fill_at)

    def _stage_row_graph(self, rg, tokens: int, rows: _StepRows, sample_idx: list[int]):
        """_prepare for a step a row graph (`RowGraphRunner`) of `tokens` rows runs: every row's token, position,
        slot, causal context length and its sequence's block table, padding rows up to `tokens` (slot -1,
        one key), the sampled rows and placeholder fills, copied straight into the graph's buffers."""
        n, s = len(rows.input_ids), rg.stride64
        nf = len(rows.fill_pos)
        i64 = np.zeros(4 * s + 2 * nf, dtype=np.int64)
        i64[:n] = rows.input_ids
        i64[s : s + n] = rows.positions
        i64[2 * s : 2 * s + n] = rows.slots
        i64[2 * s + n : 2 * s + tokens] = -1
        i64[3 * s : 3 * s + len(sample_idx)] = sample_idx
        i64[4 * s : 4 * s + nf] = rows.fill_pos
        i64[4 * s + nf :] = rows.fill_src
        mb, s32, g32 = rg.max_blocks, rg.stride32, rg.stride32g
        i32 = np.ones(s32 + g32 + n * mb, dtype=np.int32)  # padding rows: one key
        i32[:n] = np.asarray(rows.positions) + 1
        # row groups: a sequence's rows, then a padding row each, then empty groups up to one a row
        groups = i32[s32 : s32 + tokens + 1]
        groups[0] = 0
        groups[1 : len(rows.q_lens) + 1] = np.cumsum(rows.q_lens)
        pad = len(rows.q_lens) + 1
        groups[pad : pad + tokens - n] = np.arange(n + 1, tokens + 1)
        groups[pad + tokens - n :] = tokens
        i32[s32 + g32 :].reshape(n, mb)[:] = np.repeat(
            self._bt_rows.gather(rows.seqs, mb), rows.q_lens, axis=0
        )
        d64, _ = self._to_device(i64, i32, rg.static64, rg.static32)
        meta = AttentionMetadata(
            cu_seqlens_q=rg.cu_seqlens_q[: n + 1],
            seq_lens=rg.row_seq_lens[:n],
            slot_mapping=rg.slot_mapping[:n],
            block_tables=rg.block_tables[:n],
            max_seqlen_q=1,
            max_seqlen_k=max(rows.seq_lens),
            decode_only=False,
            row_seq_lens=rg.row_seq_lens[:n],
            row_groups=rg.row_groups[: len(rows.q_lens) + 1] if rg.grouped else None,
            row_group_max=rg.max_q,
        )
        fill = (d64[4 * s : 4 * s + nf], d64[4 * s + nf : 4 * s + 2 * nf]) if nf else None
        self._prompt_lp = None
        return rg.input_ids[:n], rg.positions[:n], meta, None, rows.sample_seqs, fill

    def _stage_prefill_graph(self, pg, tokens: int, rows: _StepRows):
        """_prepare for a step that prefills one sequence in the prefill graph of `tokens` tokens: its n rows,
        then a padding sequence of tokens - n rows (positions from 0, slot -1, no context), copied straight
        into the graph's buffers. The step samples at most its last row."""
        n = rows.q_lens[0]
        # (a preempted sequence's in-flight last token is its only placeholder: one fill at most)
        i64, fill_at = _staged_int64(rows, pg.stride64, tokens, pad_positions=True)
        i32 = np.zeros(8 + pg.max_blocks, dtype=np.int32)  # the padding sequence's table row stays zeros
        i32[:4] = (0, n, tokens, n - 1)  # cu_seqlens_q, then the row the graph keeps (its last)
        i32[4:6] = (rows.seq_lens[0], tokens - n)
        i32[8 : 8 + pg.max_blocks] = self._bt_rows.gather(rows.seqs, pg.max_blocks)[0]
        d64, _ = self._to_device(i64, i32, pg.static64, pg.static32)
        meta = AttentionMetadata(
            cu_seqlens_q=pg.cu_seqlens_q[:2],
            seq_lens=pg.seq_lens[:1],
            slot_mapping=pg.slot_mapping[:n],
            block_tables=pg.block_tables[:1],
            max_seqlen_q=n,
            max_seqlen_k=rows.seq_lens[0],
            decode_only=False,
            query_lens_cpu=rows.q_lens,
            seq_lens_cpu=rows.seq_lens,
        )
        return self._staged_result(pg.input_ids[:n], pg.positions[:n], meta, rows, d64, fill_at)

    def _staged_result(self, input_ids, positions, meta, rows: _StepRows, d64, fill_at: tuple[int, int]):
        """_prepare's return for a step staged in a graph's buffers (no sample index: its rows sample in order)."""
        nf = len(rows.fill_pos)
        fill = (d64[fill_at[0] : fill_at[0] + nf], d64[fill_at[1] : fill_at[1] + nf]) if nf else None
        self._prompt_lp = None
        self._sample_trim = None
        return input_ids, positions, meta, None, rows.sample_seqs, fill

    def _to_device(
        self,
        i64: np.ndarray,
        i32: np.ndarray,
        dst64: torch.Tensor | None = None,
        dst32: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """i64 and i32 on the device: new tensors, or the leading elements of dst64 / dst32 copied into."""
        if self.device.type != "cuda":
            if dst64 is None:
                return torch.from_numpy(i64), torch.from_numpy(i32)
            d64, d32 = dst64[: i64.size], dst32[: i32.size]
            d64.copy_(torch.from_numpy(i64))
            d32.copy_(torch.from_numpy(i32))
            return d64, d32
        # Persistent pinned staging buffers (a fresh pinned allocation per step can cost a
        # cudaHostAlloc and stall the host); two slots, so a slot is reused only after its copy is done.
        slot = self._staging_slot = (self._staging_slot + 1) % 2
        staging = self._staging
        buf = staging[slot]
        if buf is None or buf[0].numel() < i64.size or buf[1].numel() < i32.size:
            size64, size32 = max(i64.size * 2, 1 << 16), max(i32.size * 2, 1 << 16)
            buf = staging[slot] = (
                torch.empty(size64, dtype=torch.int64, pin_memory=True),
                torch.empty(size32, dtype=torch.int32, pin_memory=True),
                torch.cuda.Event(),
            )
        h64, h32, done = buf
        done.synchronize()  # the copy that last used this slot (two steps ago) has finished
        h64[: i64.size].numpy()[:] = i64
        h32[: i32.size].numpy()[:] = i32
        if dst64 is None:
            d64 = h64[: i64.size].to(self.device, non_blocking=True)
            d32 = h32[: i32.size].to(self.device, non_blocking=True)
        else:
            d64, d32 = dst64[: i64.size], dst32[: i32.size]
            d64.copy_(h64[: i64.size], non_blocking=True)
            d32.copy_(h32[: i32.size], non_blocking=True)
        done.record()
        return d64, d32

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None or seq.sampling_params.greedy:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            # each of a request's n completions draws its own stream from the one seed
            g = torch.Generator(device=self.device).manual_seed(seed + 1_000_003 * seq.index)
            self.generators[seq.seq_id] = g
        return g

    def release(self, seq_ids) -> None:
        for s in seq_ids:
            self.generators.pop(s, None)
        self._bt_rows.release(seq_ids)

    def sampling_metadata(
        self,
        seqs: list[Sequence],
        eos_ids,
        in_flight: list[bool] | None = None,
        trims: list[int] | None = None,
    ) -> SamplingMetadata:
        """`trims[i]`: row i samples at a draft's position (speculative decoding) with that many drafts after
        it, which are not in its history (penalties, bad words, min_tokens see each position's own)."""
        params = [s.sampling_params for s in seqs]
        # only penalties, min_tokens and bad words read a row's output history (a copy a row each step)
        outputs = [
            s.output_token_ids if (p.min_tokens or p.bad_words_token_ids or p.uses_penalties) else []
            for s, p in zip(seqs, params, strict=True)
        ]
        num_out = [s.num_output_tokens for s in seqs]
        if trims is not None:
            outputs = [o[: len(o) - t] for o, t in zip(outputs, trims, strict=True)]
            num_out = [n - t for n, t in zip(num_out, trims, strict=True)]
        stop_ids = []
        for s, n in zip(seqs, num_out, strict=True):
            p = s.sampling_params
            if n < p.min_tokens:
                stop_ids.append(
                    sorted(set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(eos_ids)))
                )
            else:
                stop_ids.append([])
        return SamplingMetadata.build(
            params,
            [s.prompt_token_ids for s in seqs],
            outputs,
            [self._generator(s) for s in seqs],
            stop_ids,
            self.vocab_size,
            self.device,
            token_bitmasks=[s.token_bitmask for s in seqs],
            in_flight=in_flight,
        )

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, eos_ids=(), prev: StepLaunch | None = None) -> StepLaunch:
        """Enqueue the step's forward and sampling on the device; returns without waiting for them.

        Tokens that are still PLACEHOLDERs on the host (sampled by `prev`, not yet read back) are taken
        from `prev`'s device tensor, so the host never waits between steps."""
        prev_rows = None
        if prev is not None and prev.token_ids_dev is not None:
            prev_rows = {sid: i for i, sid in enumerate(prev.seq_ids)}
        input_ids, positions, meta, sample_idx, sample_seqs, fill = self._prepare(sched, prev_rows)
        if fill is not None:
            input_ids.index_copy_(0, fill[0], prev.token_ids_dev.index_select(0, fill[1]))
        logits = None  # float32 [samples, V] where the decode graph ran the LM head
        if self._prefill_tokens is not None:  # one sequence's rows, staged in a prefill graph's buffers
            n = len(input_ids)
            hidden = self.prefill_graphs.replay(self._prefill_tokens, n)  # its last row, which samples
        elif self._row_tokens is not None:  # a few rows a sequence: their sampled rows' hidden states
            hidden = self.row_graphs.replay(self._row_tokens, len(input_ids), len(sample_seqs))
        elif self._staged:  # the inputs are in the graphs' buffers already
            hidden, logits = self.graph_runner.replay(meta.num_seqs)
        elif self.graph_runner is not None and self.graph_runner.can_run(meta):
            hidden = self.graph_runner.run(input_ids, positions, meta)
        else:
            # Rows that sample nothing (a prompt's tokens before its last) stop after the last layer's
            # attention: their k / v are in the cache, and nothing reads their output (prompt logprobs do)
            keep = None
            if KEEP_SAMPLED_ROWS and sample_idx is not None and self._prompt_lp is None:
                if sample_idx.shape[0] < input_ids.shape[0]:
                    keep = sample_idx
            hidden = self.model(input_ids, positions, self.kv_caches, meta, keep_rows=keep)
            if keep is not None:
                sample_idx = None  # hidden holds the sampled rows, in order
        launch = StepLaunch([s.seq_id for s in sample_seqs])
        if self._prompt_lp is not None:
            self._launch_prompt_logprobs(launch, hidden, *self._prompt_lp)
        if sample_seqs:
            if logits is None:
                rows = hidden if sample_idx is None else hidden.index_select(0, sample_idx)
                logits = self.model.compute_logits(rows).float()
            in_flight = [
                bool(prev_rows and s.num_placeholders and s.seq_id in prev_rows) for s in sample_seqs
            ]
            smeta = self.sampling_metadata(
                sample_seqs, eos_ids, in_flight if any(in_flight) else None, self._sample_trim
            )
            if smeta.output_counts is not None and prev_rows:
                self._count_in_flight_tokens(smeta, sample_seqs, prev_rows, prev)
            if smeta.pending_bans:
                self._resolve_pending_bans(smeta, sample_seqs, prev_rows, prev)
            out = self.sampler(logits, smeta)
            launch.token_ids_dev = out.sampled_token_ids
            launch.wanted_logprobs = [s.sampling_params.logprobs for s in sample_seqs]
            launch.token_ids_host = self._to_host(out.sampled_token_ids)
            if out.logprobs is not None:
                launch.logprobs = out.logprobs
        copied = launch.token_ids_host is not None or launch.prompt_lp_host is not None
        if copied and self.device.type == "cuda":  # collect waits for the copies to the host
            launch.event = torch.cuda.Event()
            launch.event.record()
        return launch

    @torch.inference_mode()
    def launch_draft_chain(
        self, seqs: list[Sequence], counts: list[int], first: StepLaunch | None = None
    ) -> StepLaunch:
        """A draft model's greedy decode steps of a speculative round (speculative decoding), enqueued as one
        unit (`draft_chain`, a DraftChain: one CUDA graph at batches it captured). Row i proposes counts[i]
        drafts from its sequence's last token, at position p = len(token_ids) - 1, whose K / V the draft's
        cache lacks: step j feeds it the token step j - 1 chose, at position p + j. Without `first`, step 0
        runs here on the last tokens; with it (that step launched already: the rows' catch-up took more than
        one token), the chain starts at step 1 from its sampled tokens. Rows whose drafts are done repeat their
        last position without writing the cache. Returns a launch whose tokens read back as [step][row], the
        steps from the first run here."""
        ch = self.draft_chain
        n, k, j0, bsz = len(seqs), ch.num_steps, 0 if first is None else 1, self.block_size
        rows = ch.padded(n)
        s = ch.stride
        i64 = np.zeros(s + 2 * k * s, dtype=np.int64)
        pos_slot = i64[s:].reshape(k, 2, s)
        pos_slot[:, 1] = -1
        table = self._bt_rows.gather(seqs, ch.max_blocks)
        base = np.fromiter((len(seq.token_ids) - 1 for seq in seqs), dtype=np.int64, count=n)
        c = np.asarray(counts, dtype=np.int64)[:, None]
        j = np.arange(k)[None, :]
        pos = base[:, None] + np.minimum(j, c - 1)  # [n, k]
        slot = table[np.arange(n)[:, None], pos // bsz].astype(np.int64) * bsz + pos % bsz
        pos_slot[:, 0, :n] = pos.T
        pos_slot[:, 1, :n] = np.where(j < c, slot, -1).T
        if first is None:
            i64[:n] = [seq.token_ids[-1] for seq in seqs]
        i32 = np.zeros(k * s + n * ch.max_blocks, dtype=np.int32)
        i32[: k * s].reshape(k, s)[:, :n] = (pos + 1).T
        i32[k * s :] = table.ravel()
        self._to_device(i64, i32, ch.static64, ch.static32)
        if first is not None:
            ch.tokens[0, :n].copy_(first.token_ids_dev)
        ch.replay(rows, j0)
        launch = StepLaunch([seq.seq_id for seq in seqs], None, self._to_host(ch.tokens[j0:, :n]))
        if self.device.type == "cuda":
            launch.event = torch.cuda.Event()
            launch.event.record()
        return launch

    def _resolve_pending_bans(self, smeta, seqs: list[Sequence], prev_rows: dict[str, int], prev) -> None:
        """Async scheduling: a bad word whose last-but-one token is a row's in-flight token is banned where
        that token, read from the previous step's device tensor, is the one the word needs."""
        rows, needed, banned = (list(x) for x in zip(*smeta.pending_bans, strict=True))
        src = [prev_rows[seqs[r].seq_id] for r in rows]
        t = to_device(
            torch.tensor([rows, needed, banned, src], dtype=torch.int64),
            self.device,
            self.device.type == "cuda",
        )
        smeta.cond_ban_rows, smeta.cond_ban_ids = t[0], t[2]
        smeta.cond_ban_hit = prev.token_ids_dev.index_select(0, t[3]) == t[1]

    def _count_in_flight_tokens(self, smeta, seqs: list[Sequence], prev_rows: dict[str, int], prev) -> None:
        """Async scheduling: a penalty row's newest output token may still be in flight (a PLACEHOLDER on
        the host, which the host's counts leave out); count it from the previous step's device tensor, so
        penalties see every output token without the host waiting for it."""
        rows, src = [], []
        for i, s in enumerate(seqs):
            if s.num_placeholders and s.seq_id in prev_rows and s.sampling_params.uses_penalties:
                rows.append(i)
                src.append(prev_rows[s.seq_id])
        if rows:
            idx = to_device(
                torch.tensor([rows, src], dtype=torch.int64), self.device, self.device.type == "cuda"
            )
            tokens = prev.token_ids_dev.index_select(0, idx[1])
            counts = smeta.output_counts  # a [N, V] view of rows V + 1 apart (sampler._bin_counts)
            flat = counts.as_strided((counts.shape[0] * counts.stride(0),), (1,))  # contiguous, 1-D
            flat.index_add_(
                0, idx[0] * counts.stride(0) + tokens, torch.ones_like(tokens, dtype=counts.dtype)
            )

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` (pinned, enqueued without waiting, on a GPU); valid once the step's event is done."""
        cuda = self.device.type == "cuda"
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        h.copy_(t, non_blocking=cuda)
        return h

    # rows of prompt logits at a time: a 2048-token prompt of a 128k vocabulary would be 1 GB of float32
    PROMPT_LOGPROBS_CHUNK = 512

    def _launch_prompt_logprobs(self, launch: StepLaunch, hidden, rows, targets, lp_seqs) -> None:
        """Enqueue SamplingParams.prompt_logprobs for this step's prompt positions: the log-softmax of the
        logits (no sampling settings applied, as vLLM's prompt logprobs) at the prompt token that follows
        and at the top k; copied to the host with the step."""
        k = max(s[3] for s in lp_seqs)
        chosen, top_ids, top_lps = [], [], []
        for a in range(0, rows.shape[0], self.PROMPT_LOGPROBS_CHUNK):
            r = rows[a : a + self.PROMPT_LOGPROBS_CHUNK]
            lp = self.model.compute_logits(hidden.index_select(0, r)).float().log_softmax(dim=-1)
            chosen.append(lp.gather(1, targets[a : a + self.PROMPT_LOGPROBS_CHUNK, None])[:, 0])
            top = lp.topk(k, dim=-1)
            top_ids.append(top.indices)
            top_lps.append(top.values)
        launch.prompt_lp_seqs = lp_seqs
        launch.prompt_lp_host = tuple(self._to_host(torch.cat(parts)) for parts in (chosen, top_ids, top_lps))

    def collect(self, launch: StepLaunch) -> ModelRunnerOutput:
        """Wait for a launched step and read its sampled tokens (and prompt logprobs) back."""
        if launch.event is not None:
            launch.event.synchronize()
        prompt_lp = _prompt_logprobs_to_lists(launch) if launch.prompt_lp_host is not None else None
        if launch.token_ids_host is None:
            return ModelRunnerOutput(launch.seq_ids, [], None, prompt_lp)
        token_ids = launch.token_ids_host.tolist()
        logprobs = None
        if launch.logprobs is not None:
            logprobs = _logprobs_to_lists(launch.logprobs, launch.wanted_logprobs)
        return ModelRunnerOutput(launch.seq_ids, token_ids, logprobs, prompt_lp)

    def execute_model(self, sched: SchedulerOutput, eos_ids=()) -> ModelRunnerOutput:
        return self.collect(self.launch(sched, eos_ids))

    def logits_for_tokens(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits [T, V] for one prompt, in float32, through the paged path (tests, eval)."""
        from hopperllm.engine.scheduler import ScheduledSeq
        from hopperllm.sampling_params import SamplingParams

        n = len(token_ids)
        nb = -(-n // self.block_size)
        if nb > self.num_kv_blocks:
            raise ValueError(f"{n} tokens need {nb} KV blocks; the cache has {self.num_kv_blocks}")
        seq = Sequence("__logits__", token_ids, SamplingParams(max_tokens=1))
        seq.block_table = list(range(nb))
        sched = SchedulerOutput(scheduled=[ScheduledSeq(seq, n)], num_batched_tokens=n)
        input_ids, positions, meta, _, _, _ = self._prepare(sched)
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            return self.model.compute_logits(hidden).float()


def _prompt_logprobs_to_lists(
    launch: StepLaunch,
) -> dict[str, tuple[int, list[dict[int, float]], list[float]]]:
    chosen, top_ids, top_lps = (t.tolist() for t in launch.prompt_lp_host)
    out, row = {}, 0
    for seq_id, first, count, k in launch.prompt_lp_seqs:
        entries = []
        for j in range(count):
            entry = dict(zip(top_ids[row + j][:k], top_lps[row + j][:k], strict=True))
            entries.append(entry)
        out[seq_id] = (first, entries, chosen[row : row + count])
        row += count
    return out


def _logprobs_to_lists(lp, wanted: list[int | None]):
    """LogprobsTensors (column 0 the sampled token, then the top-k) -> per row (chosen, {id: logprob})."""
    ids = lp.token_ids.tolist()
    vals = lp.logprobs.tolist()
    res = []
    for i, k in enumerate(wanted):
        if k is None:
            res.append(None)
            continue
        top = {int(t): float(v) for t, v in zip(ids[i][1 : 1 + k], vals[i][1 : 1 + k], strict=True)}
        res.append((float(vals[i][0]), top))
    return res


def decode_warm_variants(
    max_num_seqs: int,
    largest_graph: int | None,
    num_kv_heads: int,
    max_model_len: int,
    device: torch.device,
    rotary: bool,
) -> list[tuple[int, bool, bool, bool]]:
    """The (splits, quant_out, rotary, pdl) decode-attention variants that steps outside the CUDA graphs can
    launch (ModelRunner.warm_decode_kernels compiles them): mixed steps' flash-decoding at every split count,
    with PDL up to PDL_MAX_ROWS decodes and without beyond; decode-only batches above `largest_graph` (None:
    every batch) at the split counts and PDL settings their sizes get, with the quantized output or not."""
    from hopperllm.kernels.paged_attention import _MAX_SPLITS, choose_num_splits
    from hopperllm.kernels.pdl import PDL_MAX_ROWS

    all_splits = [1 << i for i in range(_MAX_SPLITS.bit_length())]
    variants = [(n, False, False, True) for n in all_splits]
    if max_num_seqs > PDL_MAX_ROWS:
        variants += [(n, False, False, False) for n in all_splits]
    lo = 1 if largest_graph is None else largest_graph + 1
    if lo <= max_num_seqs:
        # a batch of b sequences gets at most choose_num_splits(b, ...) slices (fewer for short contexts)
        most = choose_num_splits(lo, num_kv_heads, max_model_len, device)
        pdl = [p for p, ok in ((True, lo <= PDL_MAX_ROWS), (False, max_num_seqs > PDL_MAX_ROWS)) if ok]
        variants += [(n, q, rotary, p) for n in all_splits if n <= most for q in (False, True) for p in pdl]
    return list(dict.fromkeys(variants))
