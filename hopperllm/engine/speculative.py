"""Speculative decoding with n-gram (prompt lookup) drafts, as vLLM's `--speculative-config
'{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": N, "prompt_lookup_min": M}'`.

Before a step, a decoding sequence whose last n tokens (n from N down to M) occurred earlier in its prompt or
output proposes the K tokens that followed that occurrence. The step computes the sequence's new token and its
drafts together and samples at each of their positions; draft i is accepted while it equals the token sampled
at its position, and the first token sampled after the accepted drafts is the step's own. For a draft that is
one token for sure, accepting exactly when the sample equals it is speculative sampling's rule (accept with
probability p(draft); otherwise a sample of p without the draft), so outputs follow the same distribution as
without drafts (greedy outputs are the same tokens). The engine steps synchronously while drafting (the drafts
need the last token on the host).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self):
        if self.method not in ("ngram", "[ngram]"):
            raise ValueError(f"speculative method {self.method!r} is not supported: use ngram")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "speculative prompt_lookup_min / prompt_lookup_max need 1 <= min <= max, got "
                f"{self.prompt_lookup_min} / {self.prompt_lookup_max}"
            )

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From --speculative-config's JSON text, or a dict (vLLM's keys)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("the speculative config must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}: known ones are {sorted(known)}")
        if "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value = {**value, "prompt_lookup_min": min(1, value["prompt_lookup_max"])}
        return cls(**value)


def propose_ngram(token_ids: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `token_ids`
    (n_max down to n_min tokens long); [] when no suffix occurred before. The search runs in C over the ids
    as int32 bytes (bytes.rfind; matches must start on a token boundary)."""
    size = len(token_ids)
    if size < 2:
        return []
    raw = np.asarray(token_ids, dtype=np.int32).tobytes()
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = raw[(size - n) * 4 :]
        end = (size - 1) * 4  # an occurrence ending before the last token: not the suffix itself
        while (at := raw.rfind(suffix, 0, end)) >= 0:
            if at % 4 == 0:
                start = at // 4 + n
                return token_ids[start : start + k]
            end = at + len(suffix) - 1
    return []
