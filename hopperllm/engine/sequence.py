"""A request's token sequence and its scheduling state. Pure Python: no tensors."""

from __future__ import annotations

import enum
import time

from hopperllm.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token still on the GPU (async scheduling); never given to the model as is


class BlockTable(list):
    """A sequence's physical block ids. `version` changes whenever an id already there changes or goes
    (delete, clear, set, ...); appending and extending leave it: the model runner's numpy copy of the table
    (ModelRunner's `_BlockTableRows`) then only adds the new ids instead of converting the whole list a step."""

    __slots__ = ("version",)

    def __init__(self, *args):
        super().__init__(*args)
        self.version = 0

    def __delitem__(self, key):
        n = len(self)
        super().__delitem__(key)
        if len(self) != n:
            self.version += 1

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.version += 1

    def __imul__(self, k):
        self.version += 1
        return super().__imul__(k)

    def clear(self):
        if self:
            self.version += 1
        super().clear()

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def remove(self, value):
        super().remove(value)
        self.version += 1

    def insert(self, index, value):
        super().insert(index, value)
        self.version += 1

    def sort(self, *args, **kwargs):
        super().sort(*args, **kwargs)
        self.version += 1

    def reverse(self):
        super().reverse()
        self.version += 1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, stop token id or stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


# (module constants: these are asked of every sequence every step)
_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}
_FINISHED = frozenset(_FINISH_REASONS)


class Sequence:
    """One completion being generated: prompt + output tokens, KV blocks, progress.

    `num_computed_tokens` counts the tokens whose K/V are in the cache. A step computes
    `token_ids[num_computed_tokens : num_computed_tokens + n]`; when that reaches the end of
    `token_ids`, the step's last logits sample the next token. A prefill, a prefill chunk, a
    recompute after preemption and a decode are all this same shape.
    """

    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        request_id: str | None = None,
        index: int = 0,
        priority: int = 0,
    ):
        self.seq_id = seq_id
        self.priority = priority  # the scheduler's "priority" policy: lower values first
        self.request_id = request_id if request_id is not None else seq_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the latest (re)admission
        self.block_table: BlockTable = BlockTable()
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        self.num_preemptions = 0
        # Async scheduling: the step that samples the next token is in flight. Its token is appended as
        # PLACEHOLDER (counted, so the next step can be scheduled) and filled in when the step is read back.
        self.num_placeholders = 0
        self.hold = False  # its in-flight token ends it (max_tokens / max_model_len): schedule no more
        self.stop_reason: int | str | None = None
        # timing, filled by the engine
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        # logprobs: one entry per output token, {token_id: logprob}
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        # SamplingParams.prompt_logprobs: one entry per prompt token (None for the first, which nothing
        # predicts), filled as the prefill chunks run
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        if sampling_params is not None and getattr(sampling_params, "prompt_logprobs", None) is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
        # structured outputs: the engine's llguidance matcher (driver only), and the int32 bitmask of the
        # tokens it allows next, set before each step that samples this sequence (sent to every rank)
        self.grammar = None
        self.token_bitmask = None
        # speculative decoding: draft tokens at the end of token_ids, not yet verified (driver only)
        self.num_drafts = 0
        # speculative decoding with a draft model: the tokens whose K / V the draft's cache holds (driver only;
        # 0 again when a preemption frees the blocks)
        self.draft_computed = 0

    # -- sizes ------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Known output tokens (without a trailing in-flight placeholder)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_placeholders]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, counting an in-flight one."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the newest token is still to be computed."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
