"""The GGUF loader against transformers' GGUF loading (the reference) and against tiny files we write."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import TokenType

from hopperllm.loader.gguf import (
    count_gguf_tensors,
    default_gguf_path,
    iter_gguf_tensors,
    load_gguf_tokenizer,
    open_gguf,
    read_gguf_config,
)
from hopperllm.tokenizer import Tokenizer

# -- writing tiny GGUF files ------------------------------------------------------------------------

TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "layers": 2, "vocab": 300}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` Q/K row permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights of a tiny Llama, by HF name, in HF layout."""
    rng = np.random.default_rng(seed)
    h, ffn, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    kv = TINY["kv_heads"] * h // TINY["heads"]

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h)}
    if not tied:
        weights["lm_head.weight"] = rand(v, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(ffn, h),
            p + "mlp.up_proj.weight": rand(ffn, h),
            p + "mlp.down_proj.weight": rand(h, ffn),
            p + "input_layernorm.weight": rand(h),
            p + "post_attention_layernorm.weight": rand(h),
        }
    return weights


HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base in HF_TO_GGUF:
        return HF_TO_GGUF[base] + ".weight"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest]}.weight"


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: QT) -> None:
    if w.ndim == 1 or qtype == QT.F32:
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == QT.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: QT = QT.F32,
    tokenizer: str | None = None,
    tied: bool = False,
    weights: dict[str, np.ndarray] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """A tiny Llama GGUF, written as llama.cpp's converter would (Q/K rows permuted)."""
    weights = weights if weights is not None else tiny_hf_weights(tied=tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(512)
    w.add_embedding_length(TINY["hidden"])
    w.add_block_count(TINY["layers"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(TINY["vocab"])
    if tokenizer == "gpt2":
        add_byte_level_vocab(w)
    elif tokenizer == "llama":
        add_sentencepiece_vocab(w)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, tensor in weights.items():
        if "q_proj" in name:
            tensor = llama_cpp_permute(tensor, TINY["heads"])
        elif "k_proj" in name:
            tensor = llama_cpp_permute(tensor, TINY["kv_heads"])
        add_tensor(w, gguf_name(name), tensor, qtype)
    for name, tensor in (extra_tensors or {}).items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def add_byte_level_vocab(w: gguf.GGUFWriter) -> None:
    """A Llama-3-style byte-level BPE vocabulary: 256 bytes, a few merges, control and user tokens."""
    from hopperllm.tokenizer import bytes_to_unicode as _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "1 2", "12 3", "Ċ Ċ", "Ġ Ġ"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    specials += ["<|eot_id|>", "<｜mislabelled▁control｜>"]
    tokens = alphabet + merged + specials + ["<think>"]
    types = [TokenType.NORMAL] * (len(alphabet) + len(merged)) + [TokenType.CONTROL] * len(specials)
    types += [TokenType.USER_DEFINED]
    tokens += [f"<|reserved_{i}|>" for i in range(TINY["vocab"] - len(tokens))]
    types += [TokenType.CONTROL] * (TINY["vocab"] - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_eot_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)


def add_sentencepiece_vocab(w: gguf.GGUFWriter) -> None:
    """A Llama-2-style SentencePiece vocabulary: byte fallback, scores and no merges."""
    pieces = [
        "▁",
        "t",
        "h",
        "e",
        "l",
        "o",
        "▁t",
        "he",
        "▁the",
        "ll",
        "llo",
        "▁he",
        "▁hello",
        "▁w",
        "or",
        "ld",
    ]
    pieces += ["▁wor", "▁world", "1", "2", "▁1", "▁▁", "▁▁▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    tokens += [f"<pad{i}>" for i in range(TINY["vocab"] - len(tokens))]
    types += [TokenType.UNUSED] * (TINY["vocab"] - len(types))
    scores += [-1000.0] * (TINY["vocab"] - len(scores))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    )


# -- the default model against transformers --------------------------------------------------------


def test_default_gguf_path(smollm2_gguf_path: str) -> None:
    assert os.path.isfile(default_gguf_path())
    assert smollm2_gguf_path.endswith(".gguf")


@pytest.mark.slow
def test_config_matches_transformers(smollm2_gguf_path: str, hf_gguf_model) -> None:
    config = read_gguf_config(smollm2_gguf_path)
    hf = hf_gguf_model.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "rope_scaling" not in config
    # the values themselves, so a transformers bug shared by both cannot pass unseen
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    assert config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_tensors_match_transformers(smollm2_gguf_path: str, hf_gguf_model) -> None:
    """Dequantization (Q4_1, Q8_0, F32) and the Q/K un-permutation, tensor by tensor."""
    reader = open_gguf(smollm2_gguf_path)
    state = hf_gguf_model.state_dict()
    seen = set()
    for name, tensor in iter_gguf_tensors(reader):
        assert name in state, name
        assert tensor.dtype == torch.float32 and tensor.shape == state[name].shape, name
        assert torch.equal(tensor, state[name]), name
        seen.add(name)
    assert len(seen) == count_gguf_tensors(reader)
    assert seen == set(state) - {"lm_head.weight"}  # tied: the GGUF has no output.weight


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf_path: str) -> Tokenizer:
    return load_gguf_tokenizer(smollm2_gguf_path)


# Strings that exercise the byte-level pre-tokenizer, merges and the added special tokens.
TEXTS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "multiple   spaces\t\ttabs\n\nnewlines\r\n",
    "      ",
    "\n",
    "digits 0123456789 and 3.14159 and 1,000,000 and 2024-01-31",
    "unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, हिन्दी, العربية",
    "emoji: 🤗🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "code:\ndef f(x):\n    return x ** 2  # square\n\tif x != 0: print(f'{x!r}')\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "<|im_start|><|im_start|>",
    "almost special <|im_star|> <im_start> <|im_end",
    "I'm, you're, it's, they'll, we've, he'd",
    "zero\u200bwidth, nbsp\u00a0here, \u2028line sep",
    "a" * 300,
    "{'json': [1, 2, 3], \"key\": null}",
]


@pytest.mark.slow
def test_tokenizer_encode_matches_transformers(smollm2_tokenizer: Tokenizer, hf_gguf_tokenizer) -> None:
    tok = smollm2_tokenizer
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = hf_gguf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)
    assert tok.bos_token == hf_gguf_tokenizer.bos_token == "<|im_start|>"
    assert tok.eos_token == hf_gguf_tokenizer.eos_token == "<|im_end|>"
    assert tok.eos_token_id == hf_gguf_tokenizer.eos_token_id
    assert tok.vocab_size == len(hf_gguf_tokenizer)
    # every CONTROL token is special (transformers 5 lists only the named ones in `all_special_ids`)
    hf_special = {i for i, t in hf_gguf_tokenizer.added_tokens_decoder.items() if t.special}
    assert tok.all_special_ids == hf_special == set(range(17))


@pytest.mark.slow
def test_tokenizer_decode_matches_transformers(smollm2_tokenizer: Tokenizer, hf_gguf_tokenizer) -> None:
    tok = smollm2_tokenizer
    rng = np.random.default_rng(0)
    id_lists = [hf_gguf_tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    # random ids include special tokens and byte tokens that split a UTF-8 character
    id_lists += [rng.integers(0, tok.vocab_size, size=n).tolist() for n in (1, 5, 50)]
    id_lists += [list(range(0, 40)), [49151, 0, 1, 2]]
    for ids in id_lists:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_gguf_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), ids
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 🤡 in 日本語."},
    ],
    [{"role": "user", "content": "  spaces\n\nand newlines  "}],
]


@pytest.mark.slow
def test_chat_template_matches_transformers(smollm2_tokenizer: Tokenizer, hf_gguf_tokenizer) -> None:
    tok = smollm2_tokenizer
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            expected = hf_gguf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        expected_ids = hf_gguf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(expected_ids, dict) or hasattr(
            expected_ids, "keys"
        ):  # a BatchEncoding in transformers 5
            expected_ids = expected_ids["input_ids"]
        assert tok.encode_chat(messages) == list(expected_ids)
    # continue_final_message: an assistant turn left open for the model to continue, as transformers cuts it
    prefill = CHATS[2][:2] + [
        {"role": "user", "content": "Joke?"},
        {"role": "assistant", "content": "Why did "},
    ]
    expected = hf_gguf_tokenizer.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    got = tok.apply_chat_template(prefill, add_generation_prompt=False, continue_final_message=True)
    assert got == expected and got.endswith("Why did ")
    with pytest.raises(ValueError, match="cannot both be set"):
        tok.apply_chat_template(prefill, continue_final_message=True)


# -- tiny files: every quantization, the permutation, tokenizer types ------------------------------


@pytest.mark.parametrize(
    ("qtype", "atol"),
    [(QT.F32, 0.0), (QT.F16, 2e-3), (QT.BF16, 2e-2), (QT.Q8_0, 0.05), (QT.Q4_0, 0.6), (QT.Q4_1, 0.6)],
)
def test_tiny_gguf_dequantizes_and_unpermutes(tmp_path: Path, qtype: QT, atol: float) -> None:
    weights = tiny_hf_weights()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype, weights=weights)
    reader = open_gguf(path)
    by_gguf_name = {t.name: t for t in reader.tensors}
    loaded = dict(iter_gguf_tensors(path))
    assert set(loaded) == set(weights) and count_gguf_tensors(path) == len(weights)
    for name, expected in weights.items():
        got = loaded[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape, name
        torch.testing.assert_close(got, torch.from_numpy(expected), atol=atol, rtol=0.0)
        # exactly gguf's own dequantization, un-permuted
        raw = by_gguf_name[gguf_name(name)]
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(raw.data, raw.tensor_type), dtype=np.float32))
        ref = ref.reshape(expected.shape)
        if "q_proj" in name or "k_proj" in name:
            heads = TINY["heads"] if "q_proj" in name else TINY["kv_heads"]
            ref = ref.reshape(heads, -1, 2, ref.shape[-1]).transpose(1, 2).reshape(ref.shape)
        assert torch.equal(got, ref), name
    assert all(t.dtype == torch.bfloat16 for _, t in iter_gguf_tensors(path, dtype=torch.bfloat16))


def test_tiny_gguf_config(tmp_path: Path) -> None:
    config = read_gguf_config(write_tiny_gguf(tmp_path / "tiny.gguf", tied=True))
    assert config["tie_word_embeddings"] is True
    assert config["head_dim"] == TINY["hidden"] // TINY["heads"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (TINY["heads"], TINY["kv_heads"])
    assert config["max_position_embeddings"] == 512 and config["rms_norm_eps"] == pytest.approx(1e-6)
    assert config["bos_token_id"] is None and "rope_scaling" not in config
    assert read_gguf_config(write_tiny_gguf(tmp_path / "untied.gguf"))["tie_word_embeddings"] is False
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(**config)  # loads as a LlamaConfig


def test_rope_scaling_keys(tmp_path: Path) -> None:
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    config = read_gguf_config(write_tiny_gguf(tmp_path / "linear.gguf", metadata=linear))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = {
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 2.0,
        "llama.rope.scaling.original_context_length": 256,
    }
    config = read_gguf_config(write_tiny_gguf(tmp_path / "yarn.gguf", metadata=yarn))
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 256,
    }


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low=1.0, high=4.0, old_ctx=8192
) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter writes it for Llama 3.1+."""
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    head_dim = TINY["hidden"] // TINY["heads"]
    # head_dim 16 with theta 10000 gives too few low-frequency bands; theta 5e5 (Llama 3) covers all three
    meta = {"llama.rope.freq_base": 500000.0}
    freqs = {"rope_freqs.weight": llama3_rope_factors(head_dim, 500000.0, 8.0)}
    path = write_tiny_gguf(tmp_path / "l3.gguf", metadata=meta, extra_tensors=freqs)
    config = read_gguf_config(path)
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in dict(iter_gguf_tensors(path))
    odd = {"rope_freqs.weight": llama3_rope_factors(head_dim, 500000.0, 8.0, low=2.0)}
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf_config(write_tiny_gguf(tmp_path / "odd.gguf", metadata=meta, extra_tensors=odd))


def _hf_tokenizer_for(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


TINY_TEXTS = [
    "",
    "the and the and in 123 1234",
    " the\n\n\nand   and",
    "<|begin_of_text|>the<|eot_id|><think>and</think>",
    "hello world 12 héllo 🤗 <s> </s> <unk>",
    "  hello    world  ",
    "<｜mislabelled▁control｜>",
]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_tokenizer_matches_transformers(tmp_path: Path, kind: str) -> None:
    """Byte-level BPE with a Llama-3 split regex, and SentencePiece BPE with merges rebuilt from scores."""
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", tokenizer=kind)
    tok = load_gguf_tokenizer(path)
    hf = _hf_tokenizer_for(path)
    # Deliberate difference: transformers' GPT2Tokenizer also adds its default `<|endoftext|>` when the
    # file has none, as an id past the model's vocabulary (an out-of-range embedding row). We do not.
    hf_extra = {t.content for i, t in hf.added_tokens_decoder.items() if i >= TINY["vocab"]}
    assert hf_extra == ({"<|endoftext|>"} if kind == "gpt2" else set())
    assert tok.vocab_size == len(hf) - len(hf_extra) == TINY["vocab"]
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)
    assert tok.add_bos_token is True
    for text in TINY_TEXTS:
        for add_special_tokens in (True, False):
            ids = hf.encode(text, add_special_tokens=add_special_tokens)
            assert tok.encode(text, add_special_tokens=add_special_tokens) == ids, (kind, text)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    if kind == "gpt2":
        assert tok.eos_token_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}


# -- errors -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no GGUF file"):
        read_gguf_config(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF" * 10)
    for fn in (
        read_gguf_config,
        count_gguf_tensors,
        load_gguf_tokenizer,
        iter_gguf_tensors,
    ):
        with pytest.raises(ValueError, match="not a valid GGUF") as e:
            fn(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.9])
def test_truncated_gguf(tmp_path: Path, keep: float) -> None:
    whole = write_tiny_gguf(tmp_path / "whole.gguf", tokenizer="gpt2").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(ValueError, match="not a valid GGUF") as e:
        read_gguf_config(path)
    assert "\n" not in str(e.value)


def test_not_llama(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'"):
        read_gguf_config(path)
    with pytest.raises(ValueError, match="'gpt2'"):
        iter_gguf_tensors(path)


def test_foreign_tensor_is_an_error(tmp_path: Path) -> None:
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 32), dtype=np.float32)}
    path = write_tiny_gguf(tmp_path / "moe.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        iter_gguf_tensors(path)
