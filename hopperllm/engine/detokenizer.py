"""Incremental detokenization with stop strings (vLLM's prefix_offset / read_offset method).

Decoding token by token is wrong for two reasons: decoders add or strip spaces depending on the neighbouring
tokens (SentencePiece's leading "▁", a first token's stripped space), and byte-level tokens may hold part of
a multi-byte UTF-8 character. So each step decodes a short window that starts a few tokens before the new
ones, twice: `ids[prefix_offset:read_offset]` (already emitted) and `ids[prefix_offset:]`; the difference
is the new text. If that ends in U+FFFD the last character is incomplete: emit nothing and wait for more
tokens. The window starts in the prompt's last tokens so the first output token decodes in context.
"""

from __future__ import annotations

from hopperllm.sampling_params import SamplingParams
from hopperllm.tokenizer import Tokenizer

try:  # tokenizers >= 0.21: the same window method in Rust, one call a token (vLLM's fast detokenizer)
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python window below
    _DecodeStream = None

# how many prompt tokens give the first output token its context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
INITIAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """One sequence's output text, grown token by token, cut at the first stop string.

    Usage per step: `stop = detok.update(new_ids, stop_terminated=...)`; if `stop` is not None the sequence
    finished on a stop string (the engine records it as the stop reason); then `detok.get_next_delta(finished)`
    for streaming, or `detok.output_text` for the full text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.detokenize = params.detokenize
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.stop_strings: list[str] = list(params.stop_strings) if params.detokenize else []
        self.min_tokens = params.min_tokens
        # While streaming, hold back text that could be the start of a stop string: once it turns out to be
        # one, it must never have been sent. With include_stop_str_in_output the stop string is sent anyway.
        if self.stop_strings and not self.include_stop_str_in_output:
            self.stop_buffer_length = max(len(s) for s in self.stop_strings) - 1
        else:
            self.stop_buffer_length = 0

        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.stop_string: str | None = None  # set once a stop string matched; the text is then final
        # Decoding window: the prompt's tail, then every output token (appended as it comes).
        tail = list(prompt_token_ids[-INITIAL_DETOKENIZATION_OFFSET:])
        self._ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self._sent_offset = 0  # chars of output_text already returned by get_next_delta
        # With tokenizers' DecodeStream the window lives in Rust: primed with the prompt's tail (its text
        # discarded), then one step a token; `_ids` keeps only the ids since the last emitted text (for
        # `finish`) after the few before them (their context).
        self._stream = None
        raw = getattr(tokenizer, "_tok", None)
        if _DecodeStream is not None and params.detokenize and raw is not None:
            self._raw = raw
            self._stream = _DecodeStream(skip_special_tokens=self.skip_special_tokens)
            text = ""
            for t in tail:
                text = self._stream.step(raw, t)
            if text is None:
                # the prompt ends inside a character (or in text-less tokens): the stream would emit the
                # prompt's bytes with the first output; the Python window leaves them to the prompt
                self._stream = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Add the newly sampled tokens; return the stop string that now ends the output, if any.

        `stop_terminated`: the last of `new_token_ids` is an EOS / stop token id that finishes the sequence.
        Like vLLM, its text is then left out of `output_text` unless `include_stop_str_in_output`, and stop
        strings are not searched (the sequence has already stopped).
        """
        if self.stop_string is not None:
            raise RuntimeError("IncrementalDetokenizer.update after a stop string finished the sequence")
        self.output_token_ids.extend(new_token_ids)
        if not self.detokenize:
            return None
        to_decode = new_token_ids
        if stop_terminated and not self.include_stop_str_in_output and new_token_ids:
            to_decode = new_token_ids[:-1]

        stop_check_offset = len(self.output_text)
        num_before = len(self.output_token_ids) - len(new_token_ids)
        for i, token_id in enumerate(to_decode):
            self._ids.append(token_id)
            self.output_text += self._decode_next()
            # The first min_tokens outputs may not end the sequence: don't match stop strings ending in them.
            if num_before + i + 1 <= self.min_tokens:
                stop_check_offset = len(self.output_text)

        if stop_terminated or not self.stop_strings:
            return None
        match = find_stop_string(
            self.output_text,
            len(self.output_text) - stop_check_offset,
            self.stop_strings,
            self.include_stop_str_in_output,
        )
        if match is None:
            return None
        self.stop_string, truncate_to = match
        self.output_text = self.output_text[:truncate_to]
        return self.stop_string

    def _decode_window(self) -> tuple[str, str]:
        """(text of ids[prefix_offset:read_offset], text of ids[prefix_offset:]): the latter minus the former
        is what the ids after read_offset add, decoded in the context of the few before them."""
        window = self._ids[self._prefix_offset :]
        skip = self.skip_special_tokens
        prefix_text = self.tokenizer.decode(
            window[: self._read_offset - self._prefix_offset], skip_special_tokens=skip
        )
        return prefix_text, self.tokenizer.decode(window, skip_special_tokens=skip)

    def _decode_next(self) -> str:
        """Text that the newest id in the window adds, or "" while it ends in an incomplete character."""
        if self._stream is not None:
            text = self._stream.step(self._raw, self._ids[-1])
            if text is None:
                return ""
            # emitted: the window starts again at the ids just emitted (their context for `finish`)
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._trim_window()
            return text
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._trim_window()
        return new_text[len(prefix_text) :]

    def _trim_window(self) -> None:
        # Only ids[prefix_offset:] are ever decoded again: drop the rest so the window stays short.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def finish(self) -> None:
        """The sequence ended: append what is still pending (text that ends in an invalid UTF-8 sequence keeps
        its U+FFFD, as `tokenizer.decode` would). `get_next_delta(finished=True)` calls this."""
        if self.stop_string is not None or not self.detokenize or self._read_offset >= len(self._ids):
            return
        prefix_text, new_text = self._decode_window()
        if len(new_text) > len(prefix_text):
            self.output_text += new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)

    def get_next_delta(self, finished: bool) -> str:
        """Text not returned before. While not finished, the last `stop_buffer_length` characters are held
        back (they could be the start of a stop string); `finished=True` returns everything left."""
        if finished:
            self.finish()
            length = len(self.output_text)
        else:
            length = len(self.output_text) - self.stop_buffer_length
        if length <= self._sent_offset:
            return ""
        delta = self.output_text[self._sent_offset : length]
        self._sent_offset = length
        return delta


def find_stop_string(
    output_text: str, new_char_count: int, stop_strings: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """The stop string that ends first in the last `new_char_count` characters, and where to cut the text.

    Only a stop string that ends in the new text can be new: search from `len(stop) - 1` characters before it.
    "Ends first" makes the result independent of how the tokens were grouped into updates: the sequence stops
    where it would have stopped had the characters come one by one (of two ending at the same place, the longer
    wins). Returns (stop string, length to truncate output_text to), or None.
    """
    if new_char_count <= 0 or not stop_strings:
        return None
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stop_strings:
        start = max(len(output_text) - new_char_count - len(stop) + 1, 0)
        index = output_text.find(stop, start)
        if index != -1 and (best is None or (index + len(stop), index) < best[:2]):
            best = (index + len(stop), index, stop)
    if best is None:
        return None
    end, index, stop = best
    return stop, end if include_in_output else index
