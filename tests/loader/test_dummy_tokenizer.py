"""The dummy models' byte-level tokenizer: text round-trips through bytes, and every id of the model's
vocabulary above the bytes decodes to a placeholder word, so random tokens stream text (serving benchmarks)."""

from __future__ import annotations

from hopperllm.config import ModelConfig
from hopperllm.loader.dummy_tokenizer import byte_tokenizer
from hopperllm.loader.model_loader import load_tokenizer, resolve_model


def test_text_round_trips_and_never_encodes_to_a_placeholder():
    tok = byte_tokenizer(1000)
    text = "Hello <t300> wörld, <t999>!"
    ids = tok.encode(text, add_special_tokens=False)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text


def test_every_id_above_the_bytes_decodes_to_its_placeholder():
    tok = byte_tokenizer(1000)
    assert tok.decode([300]) == "<t300>"
    assert tok.decode([3 + ord("H"), 259, 999, 3 + ord("i")]) == "H<t259><t999>i"
    assert all(tok.decode([i]) for i in range(259, 1000))


def test_dummy_presets_get_their_vocabularys_placeholders():
    src = resolve_model("dummy:llama-3-8b")
    tok = load_tokenizer(src, ModelConfig.from_hf_dict(src.hf_config))
    assert tok.decode([128255]) == "<t128255>"
