"""Conversation datasets for `bench throughput` and `bench serve`, as vLLM's benchmarks read them.

ShareGPT (`--dataset-name sharegpt --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json`): a JSON list of
entries whose "conversations" hold turns with a "value"; entries with at least two turns are shuffled with
`--seed`, and each gives a request: the first turn is the prompt, the second's token count its output length
(or `--sharegpt-output-len` for all). Requests are kept, in that order, while

    prompt tokens >= 4, output tokens >= 4 (not checked with --sharegpt-output-len),
    prompt tokens <= 1024, prompt + output tokens <= 2048

(vLLM's pruning, from its benchmark_serving / benchmark_throughput), until `--num-prompts` are found; a file
with fewer is cycled through again. Token counts come from the model's tokenizer with its special tokens (a
BOS), as `tokenizer(text).input_ids` counts them in vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class ConversationRequest:
    prompt: str
    prompt_len: int
    output_len: int


def is_valid_sequence(prompt_len: int, output_len: int, check_output: bool = True) -> bool:
    """vLLM's pruning of dataset requests (datasets.is_valid_sequence with its defaults)."""
    if prompt_len < MIN_LEN or (check_output and output_len < MIN_LEN):
        return False
    return prompt_len <= MAX_PROMPT_LEN and prompt_len + output_len <= MAX_TOTAL_LEN


def load_sharegpt(path: str, seed: int) -> list[tuple[str, str]]:
    """The (first turn, second turn) texts of the file's entries with two or more turns, shuffled by `seed`
    (numpy's generator: the same file and seed give the same order on every machine)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--dataset-path {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--dataset-path {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        hint = " (a JSONL file of prompts is --dataset-name jsonl)" if path.endswith(".jsonl") else ""
        raise ValueError(f"--dataset-path {path}: not ShareGPT's JSON ({e}){hint}") from None
    if not isinstance(data, list):
        raise ValueError(
            f"--dataset-path {path}: ShareGPT's JSON is a list of conversations, got {type(data).__name__}"
        )
    pairs = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        texts = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"--dataset-path {path}: entry {i}: a turn without a text 'value'")
        pairs.append((texts[0], texts[1]))
    if not pairs:
        raise ValueError(f"--dataset-path {path}: no conversation with two turns")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]


def sample_sharegpt(
    pairs: Sequence[tuple[str, str]],
    num_requests: int,
    count_tokens: Callable[[Sequence[str]], Iterable[int]],
    output_len: int | None = None,
    batch: int = 64,
) -> list[ConversationRequest]:
    """The first `num_requests` valid requests of `pairs`, cycled when the file holds fewer.

    `count_tokens` maps a list of texts to their token counts (a local tokenizer, or the server's /tokenize
    in one round of requests a batch); pairs are counted `batch` at a time, so a large file is tokenized only
    as far as the requests need."""
    reqs: list[ConversationRequest] = []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo : lo + batch]
        if output_len is None:
            counts = list(count_tokens([t for pair in chunk for t in pair]))
            lens = [(counts[2 * i], counts[2 * i + 1]) for i in range(len(chunk))]
        else:
            lens = [(n, output_len) for n in count_tokens([p for p, _ in chunk])]
        for (prompt, _), (p_len, o_len) in zip(chunk, lens, strict=True):
            if is_valid_sequence(p_len, o_len, check_output=output_len is None):
                reqs.append(ConversationRequest(prompt, p_len, o_len))
                if len(reqs) == num_requests:
                    return reqs
    if not reqs:
        raise ValueError(
            f"no ShareGPT conversation fits the benchmark's limits (prompt {MIN_LEN}-{MAX_PROMPT_LEN} tokens, "
            f"output >= {MIN_LEN}, both <= {MAX_TOTAL_LEN})"
        )
    return [reqs[i % len(reqs)] for i in range(num_requests)]


def local_token_counter(model: str) -> Callable[[Sequence[str]], list[int]]:
    """Token counts from the tokenizer of `model` (an HF directory, a .gguf file or dummy:<preset>), loaded
    here without the weights: `bench serve --tokenizer`."""
    from hopperllm.config import ModelConfig
    from hopperllm.loader.model_loader import load_tokenizer, resolve_model

    src = resolve_model(model)
    tok = load_tokenizer(src, ModelConfig.from_hf_dict(src.hf_config))
    return lambda texts: [len(tok.encode(t)) for t in texts]


def resolve_name(name: str | None, path: str | None) -> str:
    """--dataset-name as given, or jsonl with a --dataset-path and random without; the two must agree."""
    name = name or ("jsonl" if path else "random")
    if name != "random" and not path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if name == "random" and path:
        raise ValueError("--dataset-path is for --dataset-name jsonl or sharegpt, not random")
    return name
