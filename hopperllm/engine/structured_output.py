"""Structured outputs (vLLM's `structured_outputs` / OpenAI's `response_format`) through llguidance.

The engine keeps one llguidance matcher per constrained sequence, on the host. Before a step that samples
such a sequence, the matcher's bitmask of the tokens that keep the output inside the constraint goes with
the sequence to the model runner (`Sequence.token_bitmask`, int32 words, bit i of word i // 32 for token
i), which masks every other token's logit to -inf before sampling; the sampled token then advances the
matcher. Constrained requests run their steps synchronously (the mask needs the previous token on the
host), as requests with penalties do. A sequence ends when its constraint is complete (llguidance's
`is_stopped`: only EOS could follow), with finish reason "stop".
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np

from hopperllm.sampling_params import StructuredOutputsParams
from hopperllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class StructuredOutputError(ValueError):
    """A structured-output constraint that does not compile (HTTP 400 naming the request's field)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # the GPU image lacks it: carry its wheel (benchmarks/device_run.sh)
        raise ValueError("structured outputs need the llguidance package (pip install llguidance)") from e
    return llguidance


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) of one constraint; raises ValueError for a schema that is not
    JSON. A grammar that does not compile is found by `StructuredOutputManager.matcher`."""
    ll = _llguidance()
    matcher = ll.LLMatcher
    if params.json is not None or params.json_object:
        schema: Any = params.json if params.json is not None else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise StructuredOutputError("the JSON schema must be a JSON object")
        options = {"whitespace_flexible": not params.disable_any_whitespace}
        try:
            return matcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise StructuredOutputError(f"invalid JSON schema: {e}") from e
    if params.regex is not None:
        return matcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        # Lark string literals are JSON strings: any choice text, quotes and newlines included
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    grammar = params.grammar
    if re.search(r"^\s*[A-Za-z_][\w-]*\s*::=", grammar, re.MULTILINE):  # GBNF (llama.cpp, vLLM's xgrammar)
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            grammar = gbnf_to_lark(grammar)
        except Exception as e:  # noqa: BLE001 - its parser raises plain exceptions
            raise StructuredOutputError(f"invalid GBNF grammar: {e}") from e
    return matcher.grammar_from_lark(grammar)


class StructuredOutputManager:
    """The engine's llguidance tokenizer (built on first use: ~1 s for a 128k vocabulary) and its matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width; ids past the tokenizer's are never allowed
        self.eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer = None
        self._executor = None  # llguidance's LLExecutor, for batches of masks

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            ll = _llguidance()
            n_vocab = max(self.vocab_size, self.tokenizer.vocab_size)
            self._ll_tokenizer = ll.LLTokenizer(
                self.tokenizer.backend_json(), n_vocab=n_vocab, eos_token=self.eos_token_ids or None
            )
        return self._ll_tokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher for one sequence; ValueError (a 400 in the server) for a constraint that does
        not compile."""
        ll = _llguidance()
        grammar = grammar_text(params)
        m = ll.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise StructuredOutputError(f"invalid structured output constraint: {m.get_error()}")
        return m

    def bitmask(self, matcher) -> np.ndarray:
        """int32 words of the tokens allowed next (bit i % 32 of word i // 32), cut to the logits' width."""
        words = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)
        return words[: (self.vocab_size + 31) // 32].copy()

    def bitmasks(self, matchers: list) -> np.ndarray:
        """`bitmask` of every matcher, [len, words]: one call into llguidance's thread pool for a batch
        (~5 us a mask where one at a time takes ~15, measured on 2 cores with SmolLM2's vocabulary)."""
        if len(matchers) == 1:
            return self.bitmask(matchers[0])[None]
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        full = (self.ll_tokenizer.vocab_size + 31) // 32
        out = np.zeros((len(matchers), full), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], out.ctypes.data, full * 4, len(matchers)
        )
        return out[:, : (self.vocab_size + 31) // 32]
