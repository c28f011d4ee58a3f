"""The sampler: logits [N, V] -> one token per row, plus optional logprobs.

Host-side work (Python lists -> tensors) happens once per step in `SamplingMetadata.build`; `Sampler.forward`
is pure tensor work with no host sync (no `.item()`, no boolean-mask indexing, no data-dependent shapes),
so the model runner can queue it behind the forward pass and read the tokens back once.

Order of operations (vLLM's):
  structured outputs' token bitmask (tokens outside the constraint -> -inf)
  -> allowed_token_ids (every other id -> -inf), bad words (an id that would complete one -> -inf),
     logit_bias (added to its ids' logits)
  -> penalties (repetition on prompt+output tokens, frequency/presence on output counts)
  -> logprobs are taken here (see `Sampler.forward`)
  -> min_tokens ban (stop ids -> -inf while a row has fewer than min_tokens outputs)
  -> greedy rows: argmax
  -> random rows: / temperature, top-k, top-p, min-p, softmax, exponential race (`argmax(probs / q)`, q ~ Exp(1)).

Reproducibility: a seeded request owns one `torch.Generator` that the caller creates once
(`torch.Generator(device).manual_seed(seed)`) and passes every step. Its row draws its V exponentials from it
and nothing else does, so a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hopperllm.sampling_params import SamplingParams

_SAMPLING_EPS = 1e-5  # temperature below this is greedy (SamplingParams.greedy)


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs for N rows, already on the device.

    The per-row scalars are None when no row reads them (every row greedy without penalties: the common
    decode step then sends nothing to the device for sampling)."""

    temperature: torch.Tensor | None  # float32 [N]; 1.0 on greedy rows (never used there)
    top_k: torch.Tensor | None  # int64 [N]; vocab_size where disabled
    top_p: torch.Tensor | None  # float32 [N]; 1.0 where disabled
    min_p: torch.Tensor | None  # float32 [N]; 0.0 where disabled
    repetition_penalties: torch.Tensor | None  # float32 [N]
    presence_penalties: torch.Tensor | None  # float32 [N]
    frequency_penalties: torch.Tensor | None  # float32 [N]
    greedy_mask: torch.Tensor | None  # bool [N]
    # only when any_penalties: counts over the vocabulary (rows without penalties are left empty)
    prompt_mask: torch.Tensor | None  # bool [N, V]
    output_counts: torch.Tensor | None  # int32 [N, V]
    # min_tokens: (row, token id) pairs to set to -inf this step; None when no row is below its min_tokens
    min_tokens_rows: torch.Tensor | None  # int64 [M]
    min_tokens_token_ids: torch.Tensor | None  # int64 [M]
    # logit_bias: (row, token id, bias) triples; None when no row has one
    logit_bias_rows: torch.Tensor | None  # int64 [B]
    logit_bias_token_ids: torch.Tensor | None  # int64 [B]
    logit_bias_values: torch.Tensor | None  # float32 [B]
    # allowed_token_ids: the rows that restrict their ids, and (row, token id) pairs of the ids they allow
    allowed_rows: torch.Tensor | None  # int64 [R]
    allowed_pair_rows: torch.Tensor | None  # int64 [A]
    allowed_pair_token_ids: torch.Tensor | None  # int64 [A]
    # bad_words: (row, token id) pairs that would complete a bad word this step
    banned_rows: torch.Tensor | None  # int64 [W]
    banned_token_ids: torch.Tensor | None  # int64 [W]
    # structured outputs: the constrained rows and their int32 bitmasks (bit t % 32 of word t // 32: token t)
    bitmask_rows: torch.Tensor | None  # int64 [G]
    token_bitmask: torch.Tensor | None  # int32 [G, ceil(V / 32)]
    generators: dict[int, torch.Generator]  # row -> its request's generator (seeded random rows only)
    all_greedy: bool
    all_random: bool
    any_penalties: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest enabled top_k among random rows (for the topk-only path); 0 if none
    max_num_logprobs: int | None  # None: no row asked for logprobs
    vocab_size: int
    # bad words under async scheduling: (row, token id) pairs banned where `cond_ban_hit` (the row's token
    # still in flight is the one the word needs before its last), and the (row, needed token, banned token)
    # triples the model runner turns into them (it holds the in-flight tokens)
    pending_bans: list[tuple[int, int, int]] = field(default_factory=list)
    cond_ban_rows: torch.Tensor | None = None  # int64 [C]
    cond_ban_ids: torch.Tensor | None = None  # int64 [C]
    cond_ban_hit: torch.Tensor | None = None  # bool [C]

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def any_top_k_p(self) -> bool:
        return self.any_top_k or self.any_top_p

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        stop_ids_for_min_tokens: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        token_bitmasks: list[np.ndarray | None] | None = None,
        in_flight: list[bool] | None = None,
    ) -> SamplingMetadata:
        """Turn per-row Python state into device tensors (all host work of a step's sampling is here).

        `vocab_size` is the logits' width (the model's padded vocabulary), not the tokenizer's.
        `stop_ids_for_min_tokens[i]`: the ids row i may not sample while it has fewer than
        `params[i].min_tokens` outputs (its EOS ids, unless ignore_eos, plus `stop_token_ids`).
        `prompt_token_ids` / `output_token_ids` are read only for rows that use penalties (outputs also for
        rows with bad words).
        `token_bitmasks[i]`: row i's structured-output bitmask (int32 words), or None for a free row.
        `in_flight[i]`: row i's newest output token is still being computed (async scheduling), so it is
        not in `output_token_ids[i]`; bad words that need it become `pending_bans`.
        """
        n = len(params)
        if not (
            len(prompt_token_ids)
            == len(output_token_ids)
            == len(generators)
            == len(stop_ids_for_min_tokens)
            == n
        ):
            raise ValueError("SamplingMetadata.build: every per-row list must have one entry per row")
        device = torch.device(device)
        pin = device.type == "cuda"

        greedy = [p.temperature < _SAMPLING_EPS for p in params]
        temperature, top_p, min_p, top_k = [], [], [], []
        for p, g in zip(params, greedy, strict=True):
            if g:  # neutral values: greedy rows never look at these
                temperature.append(1.0)
                top_p.append(1.0)
                min_p.append(0.0)
                top_k.append(vocab_size)
            else:
                temperature.append(p.temperature)
                top_p.append(p.top_p)
                min_p.append(p.min_p)
                top_k.append(vocab_size if p.top_k < 1 else min(p.top_k, vocab_size))
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        uses_penalties = [p.uses_penalties for p in params]

        any_penalties = any(uses_penalties)
        floats: torch.Tensor | list[None] = [None] * 6
        ints: torch.Tensor | list[None] = [None] * 2
        greedy_mask = None
        if not all(greedy) or any_penalties:
            # One pinned host tensor and one non-blocking copy for all per-row scalars.
            floats = to_device(
                torch.tensor([temperature, top_p, min_p, rep, pres, freq], dtype=torch.float32).reshape(6, n),
                device,
                pin,
            )
            ints = to_device(
                torch.tensor([top_k, [int(g) for g in greedy]], dtype=torch.int64).reshape(2, n), device, pin
            )
            greedy_mask = ints[1].bool()
        prompt_mask = output_counts = None
        if any_penalties:
            prompt_counts = _bin_counts(
                [t if u else [] for t, u in zip(prompt_token_ids, uses_penalties, strict=True)],
                vocab_size,
                device,
                pin,
            )
            prompt_mask = prompt_counts > 0
            output_counts = _bin_counts(
                [t if u else [] for t, u in zip(output_token_ids, uses_penalties, strict=True)],
                vocab_size,
                device,
                pin,
            )

        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, (p, out, stop_ids) in enumerate(
            zip(params, output_token_ids, stop_ids_for_min_tokens, strict=True)
        ):
            if len(out) < p.min_tokens:
                ids = sorted({t for t in stop_ids if 0 <= t < vocab_size})
                ban_rows.extend([i] * len(ids))
                ban_ids.extend(ids)
        min_tokens_rows = min_tokens_token_ids = None
        if ban_ids:
            ban = to_device(torch.tensor([ban_rows, ban_ids], dtype=torch.int64), device, pin)
            min_tokens_rows, min_tokens_token_ids = ban[0], ban[1]

        bias_rows, bias_ids, bias_values = [], [], []
        allowed_rows, pair_rows, pair_ids = [], [], []
        for i, p in enumerate(params):
            for tok, bias in (p.logit_bias or {}).items():
                if 0 <= tok < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(tok)
                    bias_values.append(float(bias))
            if p.allowed_token_ids:
                allowed_rows.append(i)
                ids = sorted({t for t in p.allowed_token_ids if 0 <= t < vocab_size})
                pair_rows.extend([i] * len(ids))
                pair_ids.extend(ids)
        logit_bias_rows = logit_bias_token_ids = logit_bias_values = None
        if bias_rows:
            pairs = to_device(torch.tensor([bias_rows, bias_ids], dtype=torch.int64), device, pin)
            logit_bias_rows, logit_bias_token_ids = pairs[0], pairs[1]
            logit_bias_values = to_device(torch.tensor(bias_values, dtype=torch.float32), device, pin)
        banned_rows = banned_ids = None
        ban_pairs, pending_bans = [], []
        for i, (p, out) in enumerate(zip(params, output_token_ids, strict=True)):
            flying = bool(in_flight and in_flight[i])
            for ids in p.bad_words_token_ids or ():
                if ids[-1] >= vocab_size:
                    continue
                if len(ids) == 1:
                    ban_pairs.append((i, ids[-1]))
                elif not flying:
                    if out[len(out) - len(ids) + 1 :] == ids[:-1]:
                        ban_pairs.append((i, ids[-1]))
                elif not ids[:-2] or out[len(out) - len(ids) + 2 :] == ids[:-2]:
                    pending_bans.append((i, ids[-2], ids[-1]))  # needs the in-flight token to be ids[-2]
        if ban_pairs:
            pairs = to_device(torch.tensor(ban_pairs, dtype=torch.int64).T.contiguous(), device, pin)
            banned_rows, banned_ids = pairs[0], pairs[1]
        allowed = allowed_pairs_rows = allowed_pairs_ids = None
        if allowed_rows:
            allowed = to_device(torch.tensor(allowed_rows, dtype=torch.int64), device, pin)
            pairs = to_device(
                torch.tensor([pair_rows, pair_ids], dtype=torch.int64).reshape(2, -1), device, pin
            )
            allowed_pairs_rows, allowed_pairs_ids = pairs[0], pairs[1]

        bitmask_rows = token_bitmask = None
        constrained = [i for i, b in enumerate(token_bitmasks or ()) if b is not None]
        if constrained:
            words = (vocab_size + 31) // 32
            host = np.full((len(constrained), words), -1, dtype=np.int32)
            for j, i in enumerate(constrained):
                b = token_bitmasks[i][:words]
                host[j, : b.shape[0]] = b
                host[j, b.shape[0] :] = 0  # a mask shorter than the logits allows none of the rest
            bitmask_rows = to_device(torch.tensor(constrained, dtype=torch.int64), device, pin)
            token_bitmask = to_device(torch.from_numpy(host), device, pin)

        random_rows = [i for i in range(n) if not greedy[i]]
        row_generators = {i: generators[i] for i in random_rows if generators[i] is not None}
        enabled_top_k = [top_k[i] for i in random_rows if top_k[i] < vocab_size]
        requested = [p.logprobs for p in params if p.logprobs is not None]

        return cls(
            temperature=floats[0],
            top_p=floats[1],
            min_p=floats[2],
            repetition_penalties=floats[3],
            presence_penalties=floats[4],
            frequency_penalties=floats[5],
            top_k=ints[0],
            greedy_mask=greedy_mask,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            min_tokens_rows=min_tokens_rows,
            min_tokens_token_ids=min_tokens_token_ids,
            logit_bias_rows=logit_bias_rows,
            logit_bias_token_ids=logit_bias_token_ids,
            logit_bias_values=logit_bias_values,
            allowed_rows=allowed,
            allowed_pair_rows=allowed_pairs_rows,
            allowed_pair_token_ids=allowed_pairs_ids,
            banned_rows=banned_rows,
            banned_token_ids=banned_ids,
            pending_bans=pending_bans,
            bitmask_rows=bitmask_rows,
            token_bitmask=token_bitmask,
            generators=row_generators,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            any_penalties=any_penalties,
            any_top_k=bool(enabled_top_k),
            any_top_p=any(top_p[i] < 1.0 for i in random_rows),
            any_min_p=any(min_p[i] > 0.0 for i in random_rows),
            max_top_k=max(enabled_top_k, default=0),
            max_num_logprobs=max(requested) if requested else None,
            vocab_size=vocab_size,
        )


def to_device(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """`t` on `device`: from pinned memory without waiting on a GPU (the CPU gets `t` itself)."""
    if device.type == "cpu":
        return t
    if pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _bin_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device, pin: bool) -> torch.Tensor:
    """int32 [N, V] occurrence counts, built on the device from one flat id tensor (ids outside [0, V) are
    ignored). The host work is one numpy pass over the ids; the counting is a scatter-add on the device."""
    n = len(token_ids)
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=n)
    ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum()))
    ids = np.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)  # out-of-vocab ids go to a spare column
    flat_index = np.repeat(np.arange(n, dtype=np.int64) * (vocab_size + 1), lengths) + ids
    flat_index = to_device(torch.from_numpy(flat_index), device, pin)
    counts = torch.zeros(n * (vocab_size + 1), dtype=torch.int32, device=device)
    counts.index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.int32))
    return counts.view(n, vocab_size + 1)[:, :vocab_size]


@dataclass
class LogprobsTensors:
    """Per row: column 0 is the sampled token, columns 1.. its top-`max_num_logprobs` tokens (best first)."""

    token_ids: torch.Tensor  # int64 [N, 1 + max_num_logprobs]
    logprobs: torch.Tensor  # float32 [N, 1 + max_num_logprobs]
    sampled_token_ranks: torch.Tensor  # int64 [N]; 1 = the most likely token


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [N]
    logprobs: LogprobsTensors | None = None


class Sampler(nn.Module):
    """Samples one token per row. Does not modify the caller's logits."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # Never write into the caller's logits: penalties and the min_tokens ban work on a copy, and the random
        # path's temperature division makes its own.
        logits = logits.float()
        if meta.bitmask_rows is not None:
            logits = apply_token_bitmask(logits, meta.bitmask_rows, meta.token_bitmask)
        if (
            meta.allowed_rows is not None
            or meta.logit_bias_rows is not None
            or meta.banned_rows is not None
            or meta.cond_ban_rows is not None
        ):
            logits = apply_allowed_and_bias(logits, meta)
        if meta.any_penalties:
            logits = apply_penalties(logits, meta)

        # Logprobs follow vLLM's "raw" flavour but after allowed_token_ids, logit_bias and penalties:
        # log_softmax of those logits, before the min_tokens ban, temperature and top-k/top-p/min-p (so they do
        # not depend on sampling settings).
        logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None

        if meta.min_tokens_rows is not None:
            if (
                not meta.any_penalties
                and meta.allowed_rows is None
                and meta.logit_bias_rows is None
                and meta.banned_rows is None
                and meta.cond_ban_rows is None
                and meta.bitmask_rows is None
            ):
                logits = logits.clone()
            # the value is made on the device: torch.tensor(-inf, device=cuda) would be a blocking copy
            logits.index_put_(
                (meta.min_tokens_rows, meta.min_tokens_token_ids), logits.new_full((), float("-inf"))
            )

        greedy_ids = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy_ids
        else:
            random_ids = self._sample_random(logits, meta)
            sampled = (
                random_ids if greedy_ids is None else torch.where(meta.greedy_mask, greedy_ids, random_ids)
            )

        out = SamplerOutput(sampled_token_ids=sampled)
        if logprobs is not None:
            out.logprobs = gather_logprobs(logprobs, meta.max_num_logprobs, sampled)
        return out

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature (into a new tensor), then top-k, top-p, min-p in place, then the exponential race."""
        logits = logits / meta.temperature.unsqueeze(1)
        if meta.any_top_p:
            logits = apply_top_k_top_p(logits, meta.top_k if meta.any_top_k else None, meta.top_p)
        elif meta.any_top_k:
            logits = apply_top_k_only(logits, meta.top_k, meta.max_top_k)
        if meta.any_min_p:
            logits = apply_min_p(logits, meta.min_p)
        probs = logits.softmax(dim=-1)
        return exponential_race(probs, meta.generators)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Structured outputs: in each row of `rows`, every token whose bit is clear in that row's int32 words
    -> -inf. Returns a new tensor; device work only (no host sync)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]
    masked = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, masked)


def apply_allowed_and_bias(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """allowed_token_ids (rows that restrict theirs keep only those ids; the rest -> -inf), the bad words'
    banned (row, id) pairs -> -inf, then each (row, id) logit_bias added. Returns a new tensor; device work
    only (no host sync)."""
    if meta.allowed_rows is not None:
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep.index_fill_(0, meta.allowed_rows, False)
        keep.index_put_((meta.allowed_pair_rows, meta.allowed_pair_token_ids), keep.new_ones(()))
        logits = logits.masked_fill(~keep, float("-inf"))
    else:
        logits = logits.clone()
    if meta.banned_rows is not None:
        logits.index_put_((meta.banned_rows, meta.banned_token_ids), logits.new_full((), float("-inf")))
    if meta.cond_ban_rows is not None:  # -inf where the in-flight token completes the word's prefix, else + 0
        minus = torch.where(meta.cond_ban_hit, float("-inf"), 0.0).to(logits.dtype)
        logits.index_put_((meta.cond_ban_rows, meta.cond_ban_ids), minus, accumulate=True)
    if meta.logit_bias_rows is not None:
        logits.index_put_(
            (meta.logit_bias_rows, meta.logit_bias_token_ids), meta.logit_bias_values, accumulate=True
        )
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (divide positive / multiply negative logits of prompt+output tokens), then the OpenAI
    frequency (x count) and presence (x seen) penalties on output tokens. Returns a new tensor."""
    assert meta.prompt_mask is not None and meta.output_counts is not None
    output_mask = meta.output_counts > 0
    seen = meta.prompt_mask | output_mask
    rep = torch.where(seen, meta.repetition_penalties.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - meta.frequency_penalties.unsqueeze(1) * meta.output_counts
    logits = logits - meta.presence_penalties.unsqueeze(1) * output_mask
    return logits


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties with the k-th kept). top_k == V disables a row.
    `max_top_k` comes from the host, so no sort and no sync: one topk of width max_top_k."""
    vocab_size = logits.shape[1]
    disabled = top_k >= vocab_size
    k_index = (top_k.clamp(max=max_top_k) - 1).clamp(min=0).unsqueeze(1)
    kth = logits.topk(max_top_k, dim=1).values.gather(1, k_index)
    kth.masked_fill_(disabled.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over the renormalized survivors: keep the smallest set of most likely tokens whose
    probability sums to at least top_p (the most likely token is always kept). One sort per row."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = logits_sort.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    cum = logits_sort.softmax(dim=-1).cumsum_(dim=-1)
    # ascending order: drop a token when everything at or below it sums to at most 1 - p,
    # i.e. when the tokens above it already hold at least p.
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    logits_sort.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, logits_idx, logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max, done in log space: l >= l_max + log(min_p)."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # log(0) = -inf keeps all
    return logits.masked_fill_(logits < threshold, float("-inf"))


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1) i.i.d., picks token i with probability p_i (a Gumbel-max in disguise) and
    needs no cumsum or host sync. Rows in `generators` draw their q from their own generator."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    # q can be exactly 0 (the sampler would then divide 0 by 0 on masked tokens and argmax would pick the NaN)
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """The sampled token's logprob and rank, and the top-`num_logprobs` (ids, logprobs) of each row."""
    token_ids = token_ids.unsqueeze(1)
    sampled_logprobs = logprobs.gather(1, token_ids)
    ranks = (logprobs > sampled_logprobs).sum(dim=-1) + 1
    if num_logprobs > 0:
        top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([token_ids, top_ids], dim=1)
        lps = torch.cat([sampled_logprobs, top_logprobs], dim=1)
    else:
        ids, lps = token_ids, sampled_logprobs
    return LogprobsTensors(token_ids=ids, logprobs=lps, sampled_token_ranks=ranks)
