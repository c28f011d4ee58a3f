"""Tokenizer: a HF `tokenizers.Tokenizer` plus special tokens and the chat template (jinja)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (the one ByteLevel pre-tokenization uses): every byte as a printable char."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    """The few things the engine needs from a tokenizer, with HF transformers' semantics."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        eos_ids = {i for i in extra_eos_token_ids if i is not None}
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        # Does tokenizer.json's post-processor already add BOS? If not, and the config asks for it, we add it.
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        self._post_processor_adds_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.add_bos_token = (
            bool(add_bos_token) if add_bos_token is not None else self._post_processor_adds_bos
        )
        self.all_special_ids: frozenset[int] = frozenset(
            i
            for t, i in (
                (t.content, tokenizer.token_to_id(t.content)) for t in self._added_tokens() if t.special
            )
            if i is not None
        )

    def _added_tokens(self):
        try:
            return list(self._tok.get_added_tokens_decoder().values())
        except AttributeError:  # older tokenizers
            return []

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ValueError(f"{path} has no tokenizer.json: hopperllm needs a fast (tokenizers) tokenizer")
        tok = _HFTokenizer.from_file(tj)
        cfg: dict[str, Any] = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc) as f:
                cfg = json.load(f)
        chat_template = cfg.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template}
            chat_template = named.get("default") or next(iter(named.values()), None)
        jinja = os.path.join(path, "chat_template.jinja")
        if chat_template is None and os.path.isfile(jinja):
            with open(jinja) as f:
                chat_template = f.read()
        return cls(
            tok,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            chat_template=chat_template,
            add_bos_token=cfg.get("add_bos_token"),
            extra_eos_token_ids=extra_eos_token_ids,
        )

    # -- encode / decode --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def backend_json(self) -> str:
        """The HF `tokenizers` serialization (tokenizer.json's text) of the underlying tokenizer."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and not self.add_bos_token
            and self._post_processor_adds_bos
            and ids[:1] == [self.bos_token_id]
        ):
            ids = ids[1:]  # tokenizer_config.json says add_bos_token: false (transformers drops it too)
        elif (
            add_special_tokens
            and self.add_bos_token
            and not self._post_processor_adds_bos
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The chat as the template renders it. `continue_final_message` (HF transformers' and vLLM's flag)
        leaves the last message open, cut right after its content, for the model to continue."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this model's tokenizer has no chat template: send a plain prompt instead of messages"
            )
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError("each chat message must be an object with a 'role' and 'content'")
        text = _render_chat(
            template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        if continue_final_message:
            final = messages[-1].get("content")
            if isinstance(final, list):  # content parts: the last one's text
                final = final[-1].get("text") if final and isinstance(final[-1], dict) else None
            final = final or ""
            at = text.rfind(final.strip()) if final.strip() else -1
            if at < 0:
                raise ValueError(
                    "continue_final_message is set but the final message's content does not appear in the "
                    "rendered chat"
                )
            # transformers' cut: keep the message's trailing spaces where the template kept them
            kept = text[at : at + len(final.lstrip())] == final
            text = text[: at + len(final.lstrip() if kept else final.strip())]
        return text

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """The chat's token ids; `kwargs` (tools, a template's own switches) reach the template."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
        )
        # HF's apply_chat_template(tokenize=True) encodes without adding special tokens: the template has them.
        return self.encode(text, add_special_tokens=False)


_JINJA_ENV = None


def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: a path to a Jinja file, or the template itself. Raises ValueError for a path
    that does not exist or a template that does not parse."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    import jinja2

    try:
        _jinja_env().parse(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template does not parse: {e} (line {e.lineno})") from None
    return template


def _render_chat(template: str, **ctx: Any) -> str:
    try:
        return _jinja_env().from_string(template).render(**ctx)
    except Exception as e:  # jinja errors become the caller's ValueError
        raise ValueError(f"chat template failed: {e}") from e


def _jinja_env():
    global _JINJA_ENV  # a cache of a pure function's environment, not state
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if _JINJA_ENV is None:

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _JINJA_ENV = env
    return _JINJA_ENV
