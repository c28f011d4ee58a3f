"""One tensor-parallel rank: its process group, its shard of the model, its KV cache and CUDA graphs,
and the loop that serves the driver (multiproc_executor.py) from a worker process.

Top to bottom: the memory check every GPU rank runs before building, the step message (the driver's
StepEncoder and each rank's SequenceMirror), the Worker, and the process main loop.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import torch

from hopperllm.config import EngineConfig
from hopperllm.distributed.process_group import all_reduce_min, destroy_tp_group, init_tp_group, warm_up
from hopperllm.engine.llm_engine import freeze_gc_heap
from hopperllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from hopperllm.engine.sequence import Sequence
from hopperllm.loader.model_loader import ModelSource
from hopperllm.worker.model_runner import ModelRunner, ModelRunnerOutput, kv_block_bytes

logger = logging.getLogger(__name__)

GiB = float(1 << 30)

# -- does the model fit? ----------------------------------------------------------------------------------


def weight_bytes_per_rank(config: EngineConfig, quantization: str | None, tp_size: int) -> tuple[int, int]:
    """(weight bytes one rank holds, KV-cache bytes per block on one rank), from the config alone.

    Linear weights take 1 byte per parameter in FP8 (plus a float32 scale per output row), else the
    model dtype's size; embeddings, LM head and norms stay in the model dtype. Linear layers and the
    vocabulary are split over the ranks; norms are replicated."""
    mc = config.model_config
    elem = torch.empty((), dtype=config.dtype).element_size()
    h, inter, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    linear_params = mc.linear_params
    out_rows = layers * ((q + 2 * kv) + h + 2 * inter + h)
    if quantization == "fp8":
        linear = linear_params + 4 * out_rows
    else:
        linear = linear_params * elem
    bias = layers * (elem * ((q + 2 * kv + h) * mc.attention_bias + (2 * inter + h) * mc.mlp_bias))
    local_vocab = -(-mc.vocab_size // tp_size)
    embeddings = local_vocab * h * elem * (1 if mc.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * h * elem
    weights = (linear + bias) // tp_size + embeddings + norms
    return weights, kv_block_bytes(config, tp_size)


def check_weights_fit(config: EngineConfig, src: ModelSource, tp_size: int, device: torch.device) -> None:
    """Raise ValueError naming the numbers when this GPU cannot hold its share of the weights plus the
    smallest KV cache the model runner accepts (a quarter of max_model_len), before anything is built:
    an out-of-memory traceback half-way through loading says much less."""
    if device.type != "cuda":
        return
    quant = config.quantization or src.checkpoint_quantization
    weights, block = weight_bytes_per_rank(config, quant, tp_size)
    max_blocks = -(-config.scheduler_config.max_model_len // config.cache_config.block_size)
    min_kv = max(1, max_blocks // 4) * block
    free, total = torch.cuda.mem_get_info(device)
    util = config.cache_config.gpu_memory_utilization
    budget = total * util - (total - free)  # what others (and our CUDA context) hold is spent already
    if weights + min_kv <= budget:
        return
    name = _model_name(config)
    dtype = str(config.dtype).removeprefix("torch.")
    what = "fp8 linear weights, " + dtype + " embeddings" if quant == "fp8" else dtype
    raise ValueError(
        f"{name} needs {weights / GiB:.1f} GiB of weights per GPU at tensor_parallel_size {tp_size} ({what}) "
        f"plus {min_kv / GiB:.2f} GiB for the smallest KV cache; the GPU has {max(budget, 0) / GiB:.1f} GiB "
        f"free at gpu_memory_utilization {util} ({free / GiB:.1f} GiB free of {total / GiB:.1f} GiB): "
        "quantize (--quantization fp8), add GPUs (--tensor-parallel-size), raise --gpu-memory-utilization "
        "or lower --max-model-len"
    )


def _model_name(config: EngineConfig) -> str:
    if not config.model:
        return "the default model"
    if config.model.startswith("dummy:"):
        return config.model
    return os.path.basename(os.path.normpath(config.model)) or config.model


# -- the step message -------------------------------------------------------------------------------------
# Each rank keeps a mirror of every running sequence; a step sends, per scheduled sequence, only what
# changed since the ranks last saw it: a decode costs a few ints, whatever the context length.


class SeqDelta(NamedTuple):
    seq_id: str
    new: tuple | None  # (request_id, index, prompt_token_ids, sampling_params) the first time it runs
    tok_start: int  # token_ids becomes token_ids[:tok_start] + tok_tail
    tok_tail: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    sample: bool
    num_placeholders: int
    bt_keep: int  # block_table becomes block_table[:bt_keep] + bt_tail
    bt_tail: list[int]
    token_bitmask: Any  # structured outputs: the tokens allowed next (int32 words), when it samples
    num_drafts: int  # speculative decoding: drafts among the scheduled tokens


class StepEncoder:
    """Driver side: a SchedulerOutput -> the SeqDeltas every rank applies to its mirror."""

    def __init__(self):
        # seq_id -> [tokens the ranks hold that are final (no placeholder), the block table they hold]
        self._sent: dict[str, list] = {}

    def encode(self, sched: SchedulerOutput) -> list[SeqDelta]:
        deltas = []
        for item in sched.scheduled:
            seq = item.seq
            sent = self._sent.get(seq.seq_id)
            tokens, table = seq.token_ids, seq.block_table
            if sent is None:
                new = (seq.request_id, seq.index, seq.prompt_token_ids, seq.sampling_params)
                tok_start = seq.num_prompt_tokens
                sent = self._sent[seq.seq_id] = [0, []]
            else:
                new = None
                tok_start = min(sent[0], len(tokens))
            # tokens before the first placeholder (or draft) are final: later steps resend from there only
            sent[0] = len(tokens) - seq.num_placeholders - item.num_drafts
            held = sent[1]
            if len(held) <= len(table) and table[: len(held)] == held:
                bt_keep = len(held)
                held.extend(table[bt_keep:])
            else:  # freed and allocated anew (preemption)
                bt_keep = 0
                sent[1] = list(table)
            deltas.append(
                SeqDelta(
                    seq.seq_id,
                    new,
                    tok_start,
                    tokens[tok_start:],
                    seq.num_computed_tokens,
                    item.num_new_tokens,
                    item.sample,
                    seq.num_placeholders,
                    bt_keep,
                    table[bt_keep:],
                    seq.token_bitmask if item.sample else None,
                    item.num_drafts,
                )
            )
        return deltas

    def forget(self, seq_ids) -> None:
        for s in seq_ids:
            self._sent.pop(s, None)


class SequenceMirror:
    """Rank side: Sequence objects rebuilt from StepEncoder's deltas, fed to the ModelRunner as is."""

    def __init__(self):
        self.seqs: dict[str, Sequence] = {}

    def decode(self, deltas: list[SeqDelta]) -> SchedulerOutput:
        scheduled = []
        for d in deltas:
            if d.new is not None:
                request_id, index, prompt, params = d.new
                seq = self.seqs[d.seq_id] = Sequence(
                    d.seq_id, prompt, params, request_id=request_id, index=index
                )
            else:
                seq = self.seqs[d.seq_id]
            del seq.token_ids[d.tok_start :]
            seq.token_ids.extend(d.tok_tail)
            del seq.block_table[d.bt_keep :]
            seq.block_table.extend(d.bt_tail)
            seq.num_computed_tokens = d.num_computed_tokens
            seq.num_placeholders = d.num_placeholders
            seq.token_bitmask = d.token_bitmask
            scheduled.append(ScheduledSeq(seq, d.num_new_tokens, d.sample, d.num_drafts))
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=sum(d.num_new_tokens for d in deltas))

    def release(self, seq_ids) -> None:
        for s in seq_ids:
            self.seqs.pop(s, None)


# -- the worker -------------------------------------------------------------------------------------------


class Worker:
    """One rank. Joins the process group, checks the model fits, builds its ModelRunner (its shard of the
    model), sizes the KV cache to what every rank has room for, captures its CUDA graphs."""

    def __init__(
        self,
        config: EngineConfig,
        src: ModelSource,
        rank: int = 0,
        world_size: int = 1,
        port: int = 0,
        timeout_s: float = 1800.0,
        show_progress: bool = True,
    ):
        self.rank = rank
        self.tp = init_tp_group(rank, world_size, config.device, port, timeout_s)
        if config.device == "cpu" and world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else None
        if device is not None:
            check_weights_fit(config, src, world_size, device)
        self.runner = ModelRunner(config, src, tp=self.tp, show_progress=show_progress)
        # speculative decoding's draft model: sharded as the target, its own KV cache over the target's
        # block tables (the same block ids), its own mirror of the drafting sequences
        self.draft: ModelRunner | None = None
        self.draft_mirror = SequenceMirror()
        spec = config.speculative_config
        if spec is not None and spec.uses_draft_model:
            from hopperllm.distributed.parallel_state import SINGLE
            from hopperllm.engine.speculative import draft_engine_config

            draft_config, draft_src = draft_engine_config(config, src.draft)
            # sharded as the target, or (draft_tensor_parallel_size 1) whole on the first rank only: the other
            # ranks then answer propose_drafts with nothing (the driver reads the first rank's drafts)
            if draft_config.parallel_config.tensor_parallel_size == world_size:
                self.draft = ModelRunner(draft_config, draft_src, tp=self.tp, show_progress=show_progress)
            elif rank == 0:
                self.draft = ModelRunner(draft_config, draft_src, tp=SINGLE, show_progress=show_progress)
        extra = self.draft.bytes_per_block() if self.draft is not None else 0
        blocks = self.runner.determine_num_kv_blocks(extra_bytes_per_block=extra)
        self.num_kv_blocks = all_reduce_min(self.tp, blocks, self.runner.device)
        self.runner.init_kv_cache(self.num_kv_blocks)
        if self.draft is not None:
            self.draft.init_kv_cache(self.num_kv_blocks)
        from hopperllm.worker.cuda_graphs import capture_decode_graphs, capture_sizes

        graphs = self.runner.device.type == "cuda" and not config.enforce_eager
        sizes = capture_sizes(config.scheduler_config.max_num_seqs, config.cuda_graph_sizes)
        self.runner.warm_decode_kernels(max(sizes) if graphs else None)
        if self.draft is not None:
            self.draft.warm_decode_kernels(max(sizes) if graphs else None)
        if graphs:
            warm_up(self.tp, self.runner.device)
            self.runner.graph_runner = capture_decode_graphs(self.runner, show_progress=show_progress)
            from hopperllm.worker.model_runner import PREFILL_GRAPHS, PREFILL_GRAPHS_TP

            if PREFILL_GRAPHS and (self.tp.world_size == 1 or PREFILL_GRAPHS_TP):
                from hopperllm.worker.cuda_graphs import capture_prefill_graphs

                self.runner.prefill_graphs = capture_prefill_graphs(self.runner, show_progress=show_progress)
            if spec is not None:
                from hopperllm.worker.cuda_graphs import capture_row_graphs

                # verify steps: each sequence's last token and up to k drafts; the draft's first step of a
                # round: its catch-up token with the last. Under tensor parallelism as the prefill graphs
                # (a draft whole on one rank has no collectives in its graphs)
                if self.tp.world_size == 1 or PREFILL_GRAPHS_TP:
                    k = spec.num_speculative_tokens
                    self.runner.row_graphs = capture_row_graphs(self.runner, k + 1, show_progress)
                if self.draft is not None and (self.draft.tp.world_size == 1 or PREFILL_GRAPHS_TP):
                    self.draft.row_graphs = capture_row_graphs(self.draft, 2, show_progress)
        if self.draft is not None:
            from hopperllm.worker.cuda_graphs import make_draft_chain

            # the draft's decode steps of a round, chained (in CUDA graphs on one GPU; a sharded draft's LM head
            # all-gathers its shards, which the decode graphs keep eager too)
            one_gpu = self.draft.tp.world_size == 1
            k = spec.num_speculative_tokens
            self.draft.draft_chain = make_draft_chain(self.draft, k, graphs and one_gpu, show_progress)
        self.mirror = SequenceMirror()
        # (step id, StepLaunch) of the latest step, whose sampled tokens feed the next step's placeholders
        self._latest: tuple[int, Any] | None = None
        self._unreported: tuple[int, Any] | None = None  # launched, tokens not read back yet

    def step(
        self, step_id: int, prev_step: int | None, report_now: bool, eos_ids, released, deltas
    ) -> list[tuple[int, ModelRunnerOutput]]:
        """Launch a step; returns the steps whose tokens are read back now: the previous unreported one
        (its device work finished while this one was being prepared), and this one if `report_now`."""
        self.release(released)
        sched = self.mirror.decode(deltas)
        latest = self._latest
        prev = latest[1] if latest is not None and latest[0] == prev_step else None
        launch = self.runner.launch(sched, eos_ids, prev)
        self._latest = (step_id, launch)
        done = self.flush()
        if report_now:
            done.append((step_id, self.runner.collect(launch)))
        else:
            self._unreported = (step_id, launch)
        return done

    def flush(self) -> list[tuple[int, ModelRunnerOutput]]:
        if self._unreported is None:
            return []
        step_id, launch = self._unreported
        self._unreported = None
        return [(step_id, self.runner.collect(launch))]

    def release(self, seq_ids) -> None:
        if seq_ids:
            self.mirror.release(seq_ids)
            self.runner.release(seq_ids)

    def release_drafts(self, seq_ids) -> None:
        """The draft model's per-sequence state (sent with propose_drafts, in order with its deltas: a released
        id may come back as a new sequence)."""
        if seq_ids and self.draft is not None:
            self.draft_mirror.release(seq_ids)
            self.draft.release(seq_ids)

    @torch.inference_mode()
    def propose_drafts(self, deltas: list[SeqDelta], released=()) -> list[list[int]]:
        """Speculative decoding with a draft model: `deltas` (a StepEncoder's, over DraftView sequences) name
        each drafting sequence's tokens, with room for its num_drafts drafts at the end (their values are
        not read), its block table (slots for the drafts' positions included) and, as num_computed_tokens,
        the tokens whose K / V the draft's cache holds. The draft catches up on the tokens before the last
        (prompt chunks within max_num_batched_tokens a launch), then runs one decode step a draft from the
        last token, greedily. Returns each sequence's drafts, in order."""
        runner = self.draft
        if runner is None:  # a rank beside a draft that runs on the first rank only (or no draft model)
            return []
        self.release_drafts(released)
        items = self.draft_mirror.decode(deltas).scheduled
        if not items:
            return []
        for it in items:  # the drafts' places (at least one a sequence): the draft model writes them
            del it.seq.token_ids[len(it.seq.token_ids) - it.num_drafts :]
        budget = runner.config.scheduler_config.max_num_batched_tokens
        # catch up while what the draft has not seen exceeds a step's token budget: chunks that stop short of
        # each sequence's last token (they sample nothing and are not read back)
        while sum(it.seq.num_uncomputed_tokens for it in items) > budget:
            chunk, room = [], budget
            for it in items:
                n = min(it.seq.num_uncomputed_tokens - 1, room)
                if n > 0:
                    chunk.append(ScheduledSeq(it.seq, n, False))
                    room -= n
                if room == 0:
                    break
            if not chunk:
                break
            runner.launch(SchedulerOutput(chunk, budget - room))
            for c in chunk:
                c.seq.num_computed_tokens += c.num_new_tokens
        # then one greedy decode step a draft, chained on the device (launch_draft_chain, one graph): from each
        # sequence's last token when that is all the draft has not seen (a round that rejected a draft); else
        # (all accepted: the last draft and the target's token) that first step in a step of its own
        counts = [it.num_drafts for it in items]
        seqs = [it.seq for it in items]
        if all(seq.num_uncomputed_tokens == 1 for seq in seqs):
            steps = runner.collect(runner.launch_draft_chain(seqs, counts)).token_ids
            return [[steps[j][i] for j in range(c)] for i, c in enumerate(counts)]
        step = [ScheduledSeq(seq, seq.num_uncomputed_tokens, True) for seq in seqs]
        first = runner.launch(SchedulerOutput(step, sum(x.num_new_tokens for x in step)))
        chain = runner.launch_draft_chain(seqs, counts, first) if max(counts) > 1 else None
        drafts = [[t] for t in runner.collect(first).token_ids]
        if chain is not None:
            steps = runner.collect(chain).token_ids
            for i, c in enumerate(counts):
                drafts[i] += [steps[j - 1][i] for j in range(1, c)]
        return drafts

    def logits_for_tokens(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.logits_for_tokens(token_ids).cpu()

    def startup_stats(self) -> dict[str, Any]:
        """What start-up made: KV blocks, and the CUDA graphs (their sizes, capture seconds)."""
        out: dict[str, Any] = {"num_kv_blocks": self.num_kv_blocks}
        for key, gr in (
            ("decode_graphs", self.runner.graph_runner),
            ("prefill_graphs", self.runner.prefill_graphs),
            ("verify_graphs", self.runner.row_graphs),
            ("draft_verify_graphs", self.draft.row_graphs if self.draft is not None else None),
            ("draft_chain_graphs", self.draft.draft_chain if self.draft is not None else None),
        ):
            if gr is not None and gr.sizes:
                out[key] = {"sizes": list(gr.sizes), "capture_s": round(gr.capture_time_s, 2)}
        return out

    def call(self, fn, *args, **kwargs):
        """What Executor.collective_rpc runs on each rank: a Worker method by name, or fn(worker, ...)."""
        return getattr(self, fn)(*args, **kwargs) if isinstance(fn, str) else fn(self, *args, **kwargs)

    def close(self) -> None:
        # the graphs hold captured NCCL work: free them before the communicator
        self.runner.graph_runner = None
        self.runner.prefill_graphs = None
        self.runner.row_graphs = None
        if self.draft is not None:
            self.draft.row_graphs = None
            self.draft.draft_chain = None
        destroy_tp_group()


# -- the worker process -----------------------------------------------------------------------------------
# Driver -> rank: pickled tuples on a multiprocessing Queue (its feeder thread: the driver never blocks
# on a busy rank). Rank -> driver: a Pipe the driver waits on together with the process sentinels.
#   ("step", step_id, prev_step, report_now, eos_ids, released, deltas) rank 0 answers ("result", id, out)
#   ("flush",)                                                          rank 0 answers pending results
#   ("rpc", method_or_callable, args, kwargs, reply_all)               every rank answers ("rpc", value)
#   ("shutdown",)
# Start-up: every rank answers ("ready", num_kv_blocks). Any failure: ("error", type, message, traceback,
# time), then the rank exits; the driver fails the engine.


def worker_main(
    rank: int,
    world_size: int,
    port: int,
    config: EngineConfig,
    src: ModelSource,
    tasks,
    results: Connection,
    show_progress: bool,
    timeout_s: float,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops us
    _exit_with_parent()
    try:
        worker = Worker(config, src, rank, world_size, port, timeout_s, show_progress)
        freeze_gc_heap()  # as the driver's engine does: no full collection walks the model in a step
        results.send(("ready", worker.num_kv_blocks))
        _serve(worker, tasks, results)
    except BaseException as e:  # everything goes to the driver, then this rank exits
        _send_error(results, e)
        os._exit(1)  # skip interpreter teardown: peers may be gone, NCCL could wait for them
    try:
        worker.close()
    finally:
        results.close()


def _serve(worker: Worker, tasks, results: Connection) -> None:
    lead = worker.rank == 0
    while True:
        msg = pickle.loads(tasks.get())
        kind = msg[0]
        if kind == "step":
            done = worker.step(*msg[1:])
        elif kind == "flush":
            done = worker.flush()
        elif kind == "rpc":
            _, fn, args, kwargs, reply_all = msg
            value = worker.call(fn, *args, **kwargs)
            results.send(("rpc", value if lead or reply_all else None))
            continue
        elif kind == "shutdown":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from the driver")
        if lead:
            for step_id, out in done:
                results.send(("result", step_id, out))


def _send_error(results: Connection, e: BaseException) -> None:
    try:
        results.send(("error", type(e).__name__, str(e), traceback.format_exc(), time.time()))
    except (OSError, ValueError):
        pass  # the driver is gone


def _exit_with_parent() -> None:
    """Exit when the driver dies, even one killed without a chance to stop us (SIGKILL)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="hopperllm-parent-watch", daemon=True).start()
