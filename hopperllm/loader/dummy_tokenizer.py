"""A byte-level tokenizer for dummy models: one token per UTF-8 byte, plus <unk>, <s>, </s>.

Dummy presets have real shapes but no vocabulary; this lets text prompts, streaming and stop strings
run on them end to end (token ids 3..258 are the bytes 0..255). Given the model's vocabulary size, every
id above the bytes decodes to a placeholder word `<t{id}>` (text never encodes to one), so that a dummy
model's random tokens stream text as a real vocabulary's would: serving benchmarks time every token
(without them ~all of a random Llama-3 vocabulary's ids decoded to nothing)."""

from __future__ import annotations

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hopperllm.tokenizer import Tokenizer, bytes_to_unicode

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(vocab_size: int | None = None) -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = 3 + b
    # placeholder words: BPE without merges only ever emits single characters, so encoding never yields
    # them; the byte-level decoder maps their printable ASCII characters to themselves
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<t{i}>"] = i
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template=_CHAT_TEMPLATE, add_bos_token=True)
