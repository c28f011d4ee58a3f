"""SamplingParams with vLLM's names and defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what a running request's outputs hold."""

    CUMULATIVE = 0  # each step, everything so far (the default)
    DELTA = 1  # each step, only what it added: new token ids, text and logprobs
    FINAL_ONLY = 2  # one output, when the request finishes (LLM.generate: no per-step output objects)


@dataclass
class StructuredOutputsParams:
    """vLLM's structured-output constraint (`SamplingParams.structured_outputs`): exactly one of a JSON
    schema (`json`, a dict or its JSON text), any JSON object (`json_object`), a regular expression, one of
    several strings (`choice`) or a Lark grammar (`grammar`; llguidance's Lark dialect, or GBNF). Every
    sampled token keeps the output a prefix of a string the constraint accepts; the request ends when
    the constraint is complete."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON only: no whitespace between tokens other than what the schema's strings hold (vLLM's flag)
    disable_any_whitespace: bool = False

    def verify(self) -> None:
        kinds = [
            name
            for name, value in (
                ("json", self.json),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object or None),
            )
            if value is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, regex, choice, grammar, json_object; got "
                + (", ".join(kinds) if kinds else "none")
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured outputs' json must be a JSON schema (an object or its JSON text)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured outputs' regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured outputs' grammar must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured outputs' choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top logprobs per output token (0: only the chosen token's)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (0: only the prompt token's own)
    detokenize: bool = True
    # OpenAI's logit_bias (token id -> a bias in [-100, 100] added to its logit before sampling) and vLLM's
    # allowed_token_ids (only these may be sampled); both act before the penalties, as in vLLM
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's bad_words: words never generated (their token sequences, with and without a leading space,
    # may not complete in the output); the engine fills bad_words_token_ids from its tokenizer
    bad_words: list[str] | None = None
    # vLLM's truncate_prompt_tokens: keep only the prompt's last k tokens (-1: the last max_model_len - 1)
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, default_factory=list)
    bad_words_token_ids: list[list[int]] | None = field(init=False, default=None)

    def __post_init__(self):
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.output_kind, bool) or self.output_kind not in set(RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        self.output_kind = RequestOutputKind(self.output_kind)
        self.verify()

    def verify(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        # the upper bound is the engine's max_logprobs (vLLM's --max-logprobs), checked on arrival
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}")
        if self.stop_strings and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError("seed must be an integer")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must map token ids to biases")
            for tok, bias in self.logit_bias.items():
                if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {tok!r}")
                if (
                    isinstance(bias, bool)
                    or not isinstance(bias, (int, float))
                    or not -100.0 <= bias <= 100.0
                ):
                    raise ValueError(
                        f"logit_bias values must be numbers in [-100, 100], got {bias!r} for {tok}"
                    )
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
            bad = [
                t for t in self.allowed_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
            ]
            if bad:
                raise ValueError(f"allowed_token_ids must be non-negative token ids, got {bad[0]!r}")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, (list, tuple))
            or not all(isinstance(w, str) and w.strip() for w in self.bad_words)
        ):
            raise ValueError("bad_words must be a list of non-empty strings")
        if self.truncate_prompt_tokens is not None and (
            isinstance(self.truncate_prompt_tokens, bool)
            or not isinstance(self.truncate_prompt_tokens, int)
            or (self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1)
        ):
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or at least 1, got {self.truncate_prompt_tokens!r}"
            )
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams")
            self.structured_outputs.verify()

    def token_ids_in_params(self) -> list[int]:
        """The token ids the request names outside its prompt (checked against the vocabulary on arrival)."""
        return [*(self.logit_bias or {}), *(self.allowed_token_ids or [])]

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        """Any of the repetition, presence or frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams (LLM.beam_search; hopperllm.engine.beam_search runs the search)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        # a step asks for 2 x beam_width logprobs: at most the engine's max_logprobs (20 by default)
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")

    def step_params(self) -> SamplingParams:
        """One beam's step: one token, the top 2 x beam_width logprobs."""
        return SamplingParams(
            max_tokens=1, logprobs=2 * self.beam_width, temperature=self.temperature, detokenize=False
        )
