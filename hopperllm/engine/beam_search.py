"""Beam search as vLLM runs it (LLM.beam_search, and `use_beam_search` in its server): every step extends
each live beam by one token through an ordinary request (max_tokens 1, the top 2 x beam_width logprobs),
keeps the beam_width best candidates by cum_logprob / length ** length_penalty, and moves candidates that
end in EOS to the finished list. Prefix caching (on by default) keeps a beam's earlier tokens computed
between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from hopperllm.sampling_params import BeamSearchParams

__all__ = ["BeamSearchParams", "BeamSearchSequence", "BeamSearchOutput", "BeamSearchInstance"]


@dataclass
class BeamSearchSequence:
    """A beam: `tokens` are the prompt's and the generated ones (vLLM's layout); `logprobs` per generated
    token, the candidates' {token id: logprob} of its step."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_token_ids, length_penalty: float) -> float:
    """vLLM's get_beam_search_score: cum_logprob / length ** length_penalty, the length counting the
    prompt and not a final EOS."""
    n = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (n**length_penalty)


class BeamSearchInstance:
    """One prompt's search: `live` beams to extend, `completed` ones."""

    def __init__(
        self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids, max_model_len: int
    ):
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.live = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []

    def _key(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos, self.params.length_penalty)

    def advance(self, candidates: list[dict[int, float] | None]) -> None:
        """`candidates[i]`: live beam i's next-token logprobs (its step's top entries and sampled token)."""
        new = []
        for beam, cands in zip(self.live, candidates, strict=True):
            for token, lp in (cands or {}).items():
                b = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [cands], beam.cum_logprob + lp)
                if token in self.eos and not self.params.ignore_eos:
                    b.finish_reason, b.stop_reason = "stop", None
                    self.completed.append(b)
                elif len(b.tokens) >= self.max_model_len:  # no room for another token
                    b.finish_reason = "length"
                    self.completed.append(b)
                else:
                    new.append(b)
        self.live = sorted(new, key=self._key, reverse=True)[: self.params.beam_width]

    def best(self) -> list[BeamSearchSequence]:
        for b in self.live:
            b.finish_reason = b.finish_reason or "length"
        done = sorted(self.completed + self.live, key=self._key, reverse=True)
        return done[: self.params.beam_width]
