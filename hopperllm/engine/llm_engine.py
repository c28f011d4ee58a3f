"""LLMEngine: tokenize, schedule, step the model, check stops, detokenize, report outputs.

One `step()` = one scheduler decision + one model forward over the flat batch + sampling.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from dataclasses import dataclass, field

from hopperllm.config import EngineConfig
from hopperllm.engine.detokenizer import IncrementalDetokenizer
from hopperllm.engine.scheduler import ScheduledSeq, Scheduler
from hopperllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from hopperllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hopperllm.sampling_params import RequestOutputKind, SamplingParams
from hopperllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PromptType = str | dict | list[int]


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    arrival_time: float
    sent_tokens: list[int] = field(default_factory=list)  # per seq: tokens already reported
    sent_prompt_logprobs: bool = False  # DELTA outputs carry the prompt's logprobs once
    finished: bool = False


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # cumulative, computed prompt tokens
    num_generation_tokens: int = 0  # cumulative
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_draft_tokens: int = 0  # speculative decoding: drafts computed, cumulative
    num_accepted_tokens: int = 0  # ... and accepted
    num_drafts: int = 0  # ... sequences' draft runs verified (a step with drafts for 3 sequences: 3)
    num_accepted_tokens_per_pos: tuple[int, ...] = ()  # ... accepted drafts by their position in the run


def freeze_gc_heap() -> None:
    """Collect, then move every live object to the collector's permanent generation (vLLM does the
    same after start-up). The weights' modules, the tokenizer, Triton's and torch's caches are a heap of
    ~10^5-10^6 objects that never die; left tracked, each full collection walks all of them (120 ms for
    SmolLM2's engine on a CPU core) at a moment set by allocation counts, which lands inside a request's
    time to first token or one of its decode steps. Frozen objects are still freed when their last
    reference goes; only a cycle among them waits for `gc.unfreeze()` (LLMEngine.shutdown)."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, executor, log_stats: bool = False):
        self.config = config
        self.tokenizer = tokenizer
        self.executor = executor
        self.num_kv_blocks = executor.num_kv_blocks
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.num_kv_blocks)
        mc = config.model_config
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(mc.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._seq_to_req: dict[str, str] = {}
        self._counter = itertools.count()
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        self.log_stats = log_stats
        # Overlap host work with the device (on by default where the executor supports it on a GPU).
        self.async_scheduling = config.device == "cuda"
        self._pending = None  # (StepLaunch, [(seq, position of its placeholder)]) of the in-flight step
        self._num_sync_requests = 0  # requests whose steps need every earlier token on the host
        self._structured = None  # StructuredOutputManager, made by the first constrained request
        # speculative decoding: its config, and the drafts proposed / accepted so far
        self.speculative = config.speculative_config
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_drafts = 0
        spec = self.speculative
        self.accepted_per_pos = [0] * (spec.num_speculative_tokens if spec is not None else 0)
        # --generation-config: SamplingParams defaults from the model's generation_config.json (vLLM's rule)
        self.default_sampling: dict = {}
        freeze_gc_heap()  # last: the model, its CUDA graphs and the caches exist now

    @classmethod
    def from_engine_args(cls, args, show_progress: bool = True) -> LLMEngine:
        from hopperllm.loader.model_loader import generation_defaults, load_tokenizer
        from hopperllm.worker.executor import make_executor

        config, src = args.create_engine_config()
        defaults = generation_defaults(args.generation_config, src)  # before the weights load
        tokenizer = load_tokenizer(src, config.model_config)
        executor = make_executor(config, src, show_progress=show_progress)
        engine = cls(config, tokenizer, executor)
        engine.default_sampling = defaults
        if defaults:
            logger.info("sampling defaults from the model's generation config: %s", defaults)
        return engine

    # -- requests ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.config.scheduler_config.max_model_len

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def truncate_prompt(self, token_ids: list[int], k: int | None) -> list[int]:
        return truncate_prompt(token_ids, k, self.max_model_len)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids as it starts the text and, where that tokenizes as a word of its own,
        after a space (vLLM's rule). Raises ValueError for a word with an id past the vocabulary."""
        out: list[list[int]] = []
        vocab = self.config.model_config.vocab_size
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in (plain, spaced):
                if (
                    ids
                    and ids not in out
                    and (ids is plain or (ids[0] != plain[0] and len(ids) == len(plain)))
                ):
                    if max(ids) >= vocab:
                        raise ValueError(f"bad word {word!r} has token id {max(ids)} outside the vocabulary")
                    out.append(ids)
        return out

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.model_config.vocab_size
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is out of range [0, {vocab})")
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and cap >= 0 and k > cap:
                raise ValueError(
                    f"{name}: requested {k}, more than max_logprobs {cap} (raise --max-logprobs)"
                )
            if k is not None and k > vocab:
                raise ValueError(f"{name}: requested {k}, more than the vocabulary's {vocab} tokens")
        bad = [t for t in params.token_ids_in_params() if t >= vocab]
        if bad:
            raise ValueError(
                f"token id {bad[0]} in logit_bias / allowed_token_ids is out of range [0, {vocab})"
            )
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, which leaves no room to generate within max_model_len "
                f"{self.max_model_len}: shorten the prompt or raise max_model_len"
            )
        need_blocks = -(-(n + 1) // self.config.cache_config.block_size)
        if need_blocks > self.num_kv_blocks:
            raise ValueError(
                f"the prompt has {n} tokens and needs {need_blocks} KV-cache blocks, but the cache has only "
                f"{self.num_kv_blocks}: shorten the prompt or give the cache more memory"
            )

    def prepare_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> _Request:
        """Tokenize and validate (raising ValueError for bad input) without touching the scheduler.
        `priority` orders requests under the "priority" scheduling policy (lower first; vLLM's)."""
        params = params or SamplingParams()
        params.verify()
        check_priority(priority, self.config.scheduler_config.policy)
        if request_id is None:
            request_id = f"req-{next(self._counter)}"
        prompt_text, token_ids = self.tokenize_prompt(prompt)
        token_ids = self.truncate_prompt(token_ids, params.truncate_prompt_tokens)
        if params.bad_words:
            params.bad_words_token_ids = self.bad_words_token_ids(params.bad_words)
        self.validate_prompt(token_ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs, detoks = [], []
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seqs.append(
                Sequence(
                    seq_id, token_ids, params, arrival, request_id=request_id, index=i, priority=priority
                )
            )
            detoks.append(
                IncrementalDetokenizer(self.tokenizer, token_ids, params) if params.detokenize else None
            )
        if params.structured_outputs is not None:
            for seq in seqs:  # a constraint that does not compile is the caller's error (ValueError)
                seq.grammar = self.structured_output_manager.matcher(params.structured_outputs)
        return _Request(request_id, prompt_text, token_ids, params, seqs, detoks, arrival, [0] * params.n)

    def commit_request(self, req: _Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self._num_sync_requests += _needs_sync(req.params)
        for seq in req.seqs:
            self._seq_to_req[seq.seq_id] = req.request_id
            self.scheduler.add_seq(seq)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        limit = self.config.scheduler_config.max_waiting_requests
        if limit is not None and self.scheduler.num_waiting >= limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests)")
        req = self.prepare_request(request_id, prompt, params, arrival_time, priority)
        self.commit_request(req)
        return req.request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        seq_ids = []
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            self._num_sync_requests -= _needs_sync(req.params)
            seq_ids += [s.seq_id for s in req.seqs]
        aborted = self.scheduler.abort_seqs(seq_ids)
        for s in seq_ids:
            self._seq_to_req.pop(s, None)
        self.executor.release(seq_ids)
        del aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._pending is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step ---------------------------------------------------------------------------
    @property
    def structured_output_manager(self):
        if self._structured is None:
            from hopperllm.engine.structured_output import StructuredOutputManager

            self._structured = StructuredOutputManager(
                self.tokenizer, self.config.model_config.vocab_size, self.eos_token_ids
            )
        return self._structured

    def _async_ok(self) -> bool:
        # structured outputs read the exact output history when the step is built: they need every token
        # on the host
        return (
            self.async_scheduling
            and self.executor.supports_async
            and self._num_sync_requests == 0
            and not self._drafting()  # drafts come from the last token, on the host
        )

    def _drafting(self) -> bool:
        """Whether this step proposes drafts: speculation configured, and fewer sequences running than its
        disable_by_batch_size."""
        spec = self.speculative
        return spec is not None and (
            spec.disable_by_batch_size is None or len(self.scheduler.running) < spec.disable_by_batch_size
        )

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; read back the previous one.

        With async scheduling the device runs step N while the host reads back step N-1's tokens, checks
        stops, detokenizes and prepares step N+1: the host never leaves the device idle. A token sampled
        by an in-flight step is a PLACEHOLDER on the host until read back (the model runner feeds it to the
        next step from device memory). A sequence that stops is found one step late; that step's token
        for it is dropped."""
        touched: dict[str, _Request] = {}
        use_async = self._async_ok()
        if not use_async and self._pending is not None:
            self._finish_pending(touched)
        drafted = self._propose_drafts() if not use_async and self._drafting() else []
        sched = self.scheduler.schedule()
        if drafted:
            self._fit_drafts(sched, drafted)
            if self.speculative.uses_draft_model:
                self._run_draft_model(sched)
        launch = None
        sampled: list[tuple[Sequence, int]] = []
        if sched.scheduled:
            if self._num_sync_requests:  # constrained requests run: their masks for this step
                constrained = []
                for item in sched.scheduled:
                    if item.seq.grammar is not None:
                        item.seq.token_bitmask = None
                        if item.sample:
                            constrained.append(item.seq)
                if constrained:
                    masks = self._structured.bitmasks([s.grammar for s in constrained])
                    for seq, mask in zip(constrained, masks, strict=True):
                        seq.token_bitmask = mask
            prev = self._pending[0] if self._pending is not None else None
            launch = self.executor.launch(sched, self.eos_token_ids, prev)
            now = time.monotonic()
            for item in sched.scheduled:
                seq = item.seq
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
                if seq.num_computed_tokens < seq.num_prompt_tokens:
                    self.num_prompt_tokens += min(
                        item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
                    )
                if item.sample:
                    pos = seq.num_tokens
                    sampled.append((seq, pos))
                    if use_async:
                        seq.append_token(PLACEHOLDER)
                        seq.num_placeholders += 1
                        seq.hold = self._ends_by_length(seq, pos)
        if self._pending is not None:
            self._finish_pending(touched)  # fills the placeholders before the blocks are hashed below
        if launch is not None and drafted and any(item.num_drafts for item in sched.scheduled):
            self._finish_speculative_step(sched, launch, touched)
        elif launch is not None:
            self.scheduler.update_after_step(sched)
            if use_async:
                self._pending = (launch, sampled)
            else:
                self._process_launch(launch, sampled, touched)
        now = time.monotonic()
        for seq in sched.finished:  # the scheduler gave up on these (cache too small)
            req = self.requests.get(self._seq_to_req.get(seq.seq_id, ""))
            if req is not None:
                seq.finished_time = now
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.params.output_kind == RequestOutputKind.FINAL_ONLY and not all(
                s.is_finished for s in req.seqs
            ):
                continue  # LLM.generate: no output object (and no copy of the tokens so far) each step
            ro = self._make_output(req)
            outputs.append(ro)
            if ro.finished:
                self._free_request(req)
        return outputs

    # -- speculative decoding ------------------------------------------------------------------
    def _propose_drafts(self) -> list[Sequence]:
        """Append drafts to the running sequences that can take them (hopperllm.engine.speculative): n-gram
        drafts, or for a draft model the places of its drafts (it writes them once the scheduler has given
        their positions slots: _run_draft_model); returns those sequences. Only while the cache has room to
        spare: drafts never cost a preemption."""
        from hopperllm.engine.speculative import propose_ngram

        cfg = self.speculative
        running = self.scheduler.running
        bm = self.scheduler.block_manager
        if not running or bm.num_free_blocks < len(running) * (
            cfg.num_speculative_tokens // bm.block_size + 2
        ):
            return []
        drafted = []
        for seq in running:
            p = seq.sampling_params
            if seq.num_uncomputed_tokens != 1 or seq.num_placeholders or seq.hold or not _can_draft(p):
                continue
            max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
            room = min(self.max_model_len - seq.num_tokens - 1, max_tokens - seq.num_output_tokens - 1)
            if cfg.max_model_len is not None:  # the draft's positions stay below it
                room = min(room, cfg.max_model_len - seq.num_tokens)
            k = min(cfg.num_speculative_tokens, room)
            if k < 1:
                continue
            if cfg.uses_draft_model:
                drafts = [0] * k
            else:
                drafts = propose_ngram(seq.token_ids, k, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            if drafts:
                seq.token_ids.extend(drafts)
                seq.num_drafts = len(drafts)
                drafted.append(seq)
        return drafted

    def _fit_drafts(self, sched, drafted: list[Sequence]) -> None:
        """Drafts the step does not compute go: all of a sequence it did not schedule (or preempted), the
        tail beyond a token budget that cut the sequence's chunk short."""
        items = {id(item.seq): item for item in sched.scheduled}
        for seq in drafted:
            item = items.get(id(seq))
            keep = 0 if item is None else min(seq.num_drafts, item.num_new_tokens - 1)
            if keep < seq.num_drafts:
                del seq.token_ids[len(seq.token_ids) - (seq.num_drafts - keep) :]
                seq.num_drafts = keep
            if item is not None:
                item.num_drafts = keep
                item.sample = True  # the chunk now ends the sequence

    def _run_draft_model(self, sched) -> None:
        """The draft model's tokens into the places _propose_drafts made (those the step kept): it feeds each
        sequence's last token and then its drafts but the last, so its cache then holds every token but the
        last draft."""
        from hopperllm.engine.scheduler import ScheduledSeq, SchedulerOutput
        from hopperllm.engine.speculative import DraftView

        items = [item for item in sched.scheduled if item.num_drafts]
        if not items:
            return
        views = [ScheduledSeq(DraftView(item.seq), 0, True, item.num_drafts) for item in items]
        drafts = self.executor.propose_drafts(SchedulerOutput(views))
        for item, d in zip(items, drafts, strict=True):
            seq = item.seq
            seq.token_ids[len(seq.token_ids) - item.num_drafts :] = d
            seq.draft_computed = seq.num_tokens - 1

    def _finish_speculative_step(self, sched, launch, touched: dict[str, _Request]) -> None:
        """Read a step with drafts back: each drafted sequence keeps its drafts up to the first that differs
        from the token sampled at its position and then takes that sample (or, all kept, the one after the
        last draft); the blocks are hashed once the rejected drafts are gone; then every new token is
        checked for stops as if it had come alone."""
        out = self.executor.collect(launch)
        self._record_prompt_logprobs(out)
        row = 0
        emitted: list[tuple[ScheduledSeq, list[int], list]] = []
        for item in sched.scheduled:
            if not item.sample:
                continue
            d = item.num_drafts
            rows = out.token_ids[row : row + d + 1]
            # each position's logprobs entry holds the token sampled there: the emitted one where kept
            lps = out.logprobs[row : row + d + 1] if out.logprobs is not None else [None] * (d + 1)
            row += d + 1
            seq = item.seq
            if d:
                drafts = seq.token_ids[len(seq.token_ids) - d :]
                a = 0
                while a < d and rows[a] == drafts[a]:
                    a += 1
                del seq.token_ids[len(seq.token_ids) - (d - a) :]  # the rejected drafts: their KV is garbage
                seq.draft_computed = min(seq.draft_computed, seq.num_tokens)  # in the draft's cache too
                item.num_new_tokens -= d - a
                seq.num_drafts = a  # still in token_ids, computed: hashed below, then processed
                self.num_draft_tokens += d
                self.num_accepted_tokens += a
                self.num_drafts += 1
                for i in range(a):
                    self.accepted_per_pos[i] += 1
                emitted.append((item, drafts[:a] + [rows[a]], lps[: a + 1]))
            else:
                emitted.append((item, rows[:1], lps[:1]))
        self.scheduler.update_after_step(sched)
        now = time.monotonic()
        for item, tokens, lps in emitted:
            seq = item.seq
            if seq.num_drafts:  # the accepted drafts come back through _process_token, one by one
                del seq.token_ids[len(seq.token_ids) - seq.num_drafts :]
                seq.num_drafts = 0
            req = self.requests.get(self._seq_to_req.get(seq.seq_id, ""))
            if req is None or seq.is_finished:  # aborted while the step ran
                continue
            for token, lp in zip(tokens, lps, strict=True):
                self._process_token(req, seq, token, lp, now, seq.num_tokens)
                touched[req.request_id] = req
                if seq.is_finished:
                    break

    def _ends_by_length(self, seq: Sequence, pos: int) -> bool:
        """Whether the token sampled into position `pos` reaches max_tokens or max_model_len."""
        p = seq.sampling_params
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
        return pos + 1 - seq.num_prompt_tokens >= max_tokens or pos + 1 >= self.max_model_len

    def _finish_pending(self, touched: dict[str, _Request]) -> None:
        launch, sampled = self._pending
        self._pending = None
        self._process_launch(launch, sampled, touched)

    def _process_launch(
        self, launch, sampled: list[tuple[Sequence, int]], touched: dict[str, _Request]
    ) -> None:
        out = self.executor.collect(launch)
        now = time.monotonic()
        self._record_prompt_logprobs(out)
        for i, ((seq, pos), token) in enumerate(zip(sampled, out.token_ids, strict=True)):
            req = self.requests.get(self._seq_to_req.get(seq.seq_id, ""))
            if req is None or seq.is_finished:  # aborted while the step ran
                continue
            lp = out.logprobs[i] if out.logprobs is not None else None
            self._process_token(req, seq, token, lp, now, pos)
            touched[req.request_id] = req

    def _record_prompt_logprobs(self, out) -> None:
        for seq_id, (first, tops, chosen) in (out.prompt_logprobs or {}).items():
            req = self.requests.get(self._seq_to_req.get(seq_id, ""))
            seq = next((s for s in req.seqs if s.seq_id == seq_id), None) if req is not None else None
            if seq is None or seq.prompt_logprobs is None:  # aborted while the step ran
                continue
            for j, (top, lp) in enumerate(zip(tops, chosen, strict=True)):
                pos = first + 1 + j
                seq.prompt_logprobs[pos] = {**top, seq.prompt_token_ids[pos]: lp}

    def _process_token(self, req: _Request, seq: Sequence, token: int, lp, now: float, pos: int) -> None:
        if pos == seq.num_tokens:
            seq.append_token(token)
        else:  # fill the placeholder of an async step
            seq.token_ids[pos] = token
            seq.num_placeholders -= 1
        self.num_generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        if lp is not None:
            chosen, top = lp
            entry = dict(top)
            entry[token] = chosen
            seq.output_logprobs.append(entry)
            seq.cumulative_logprob += chosen
        p = seq.sampling_params
        status = None
        n_out = pos + 1 - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif token in (p.stop_token_ids or ()):
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        detok = req.detoks[seq.index]
        if detok is not None:
            stop_str = detok.update([token], stop_terminated=status is not None)
            if stop_str is not None:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
        if seq.grammar is not None and status is None and token not in self.eos_token_ids:
            if not seq.grammar.consume_token(token):
                logger.warning(
                    "request %s left its structured output: %s", req.request_id, seq.grammar.get_error()
                )
                status = SequenceStatus.FINISHED_STOPPED
            elif seq.grammar.is_stopped():  # complete: nothing but EOS may follow (its text is output)
                status = SequenceStatus.FINISHED_STOPPED
        if status is None and self._ends_by_length(seq, pos):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if len(seq.token_ids) > pos + 1:  # drop the token of a step launched after this one
                del seq.token_ids[pos + 1 :]
                seq.num_placeholders = 0
            seq.finished_time = now
            self.scheduler.finish_seq(seq, status)

    def _make_output(self, req: _Request) -> RequestOutput:
        """The request's output now: everything so far, or with output_kind DELTA what was added since the
        last one (the prompt's logprobs in the first that has them)."""
        delta = req.params.output_kind == RequestOutputKind.DELTA
        outs = []
        for i, seq in enumerate(req.seqs):
            detok = req.detoks[i]
            finished = seq.is_finished
            ids = seq.output_token_ids
            sent = req.sent_tokens[i]
            delta_ids = ids[sent:]
            req.sent_tokens[i] = len(ids)
            delta_text = detok.get_next_delta(finished) if detok is not None else ""
            text = detok.output_text if detok is not None else ""
            p = seq.sampling_params
            logprobs = None
            if p.logprobs is not None:
                logprobs = list(seq.output_logprobs[sent:] if delta else seq.output_logprobs)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=delta_text if delta else text,
                    token_ids=delta_ids if delta else list(ids),
                    cumulative_logprob=seq.cumulative_logprob if p.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=seq.status.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=delta_text,
                    delta_token_ids=delta_ids,
                )
            )
        s0 = req.seqs[0]
        if len(req.seqs) == 1:  # (the common case, without the generators below)
            finished = s0.is_finished
            first, last = s0.first_token_time or None, s0.last_token_time or None
            end = (s0.finished_time or 0) if finished else None
        else:
            finished = all(s.is_finished for s in req.seqs)
            first = min((s.first_token_time for s in req.seqs if s.first_token_time), default=None)
            last = max((s.last_token_time for s in req.seqs if s.last_token_time), default=None)
            end = max((s.finished_time or 0 for s in req.seqs), default=None) if finished else None
        metrics = RequestMetrics(
            arrival_time=req.arrival_time,
            first_scheduled_time=s0.first_scheduled_time,
            first_token_time=first,
            last_token_time=last,
            finished_time=end,
            num_cached_tokens=s0.num_cached_tokens,
        )
        prompt_lp = s0.prompt_logprobs
        if prompt_lp is not None:
            prompt_lp = list(prompt_lp) if s0.num_computed_tokens >= s0.num_prompt_tokens else None
            if delta and prompt_lp is not None:
                prompt_lp, req.sent_prompt_logprobs = (None if req.sent_prompt_logprobs else prompt_lp), True
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            outs,
            finished,
            metrics,
            prompt_logprobs=prompt_lp,
        )

    def _free_request(self, req: _Request) -> None:
        if self.requests.pop(req.request_id, None) is not None:
            self._num_sync_requests -= _needs_sync(req.params)
        for s in req.seqs:
            self._seq_to_req.pop(s.seq_id, None)
        self.executor.release([s.seq_id for s in req.seqs])

    # -- stats ------------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        s = self.scheduler.get_stats()
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=s["num_running"],
            num_waiting=s["num_waiting"],
            kv_cache_usage=s["kv_cache_usage"],
            prefix_cache_hit_rate=s["prefix_cache_hit_rate"],
            num_preemptions=s["num_preemptions"],
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            num_drafts=self.num_drafts,
            num_accepted_tokens_per_pos=tuple(self.accepted_per_pos),
        )

    def reset_prefix_cache(self) -> bool:
        if self.has_unfinished_requests():
            return False
        self.scheduler.block_manager.reset_prefix_cache()
        return True

    def shutdown(self) -> None:
        self.executor.shutdown()
        gc.unfreeze()  # the next gc.collect() may free cycles among the engine's objects again


def truncate_prompt(token_ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: as many as leave one to generate within
    max_model_len; None or 0: all of them, 0 being SamplingParams' error to report)."""
    if not k:
        return token_ids
    k = max_model_len - 1 if k == -1 else k
    return token_ids[-k:] if len(token_ids) > k else token_ids


def check_priority(priority: int, policy: str) -> None:
    """A request's priority under the scheduling policy: any integer with "priority", only 0 with "fcfs" (as
    vLLM refuses it); ValueError otherwise."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(
            f"got priority {priority} but priority scheduling is not enabled (--scheduling-policy priority)"
        )


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests; retry later (HTTP 429/503)."""


def _can_draft(p: SamplingParams) -> bool:
    """Every request but a constrained one (its mask at a draft's position would need the matcher advanced
    through the drafts before it). Penalties, bad words and min_tokens see each position's own history."""
    return p.structured_outputs is None


def _needs_sync(p: SamplingParams) -> bool:
    """Structured outputs decide a step's allowed tokens on the host from every earlier token: no async
    scheduling while such a request runs. (Penalties count the in-flight token on the device, and bad words
    check it there: ModelRunner._count_in_flight_tokens, _resolve_pending_bans.)"""
    return p.structured_outputs is not None
