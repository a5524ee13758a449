"""Chat templates: the model's `tokenizer.chat_template` (Jinja2) rendered the way HuggingFace
transformers renders it, so a prompt built here is the same string `apply_chat_template` gives.

HF conventions reproduced: ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks and
the loop-controls extension; variables `messages`, `add_generation_prompt`, `bos_token`,
`eos_token` plus any extra keyword (tools, documents, ...); globals `raise_exception(msg)` and
`strftime_now(fmt)`; `tojson` that keeps non-ASCII characters; a `{% generation %}` block that
just renders its body. A model without a template gets ChatML.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from dsd.errors import DsdError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(DsdError):
    """The chat template failed to compile or render (message names the model's template)."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # a plain str, as transformers' filter returns: a markupsafe.Markup would HTML-escape every
    # str concatenated to it (gpt-oss's harmony template renders a tool result as
    # "...<|channel|>commentary<|message|>" + content|tojson + "<|end|>", which came out as
    # "&lt;|channel|&gt;...")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """HF's `{% generation %}...{% endgeneration %}` marks assistant text for masks; for
        rendering it is transparent."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 name: str = "model"):
        self.is_fallback = not source
        self.source = source or CHATML_TEMPLATE
        self.bos_token, self.eos_token = bos_token, eos_token
        self.name = name
        self._error: str | None = None
        try:
            self._template = _environment().from_string(self.source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            self._template = None
            self._error = f"{type(e).__name__}: {e}"

    @classmethod
    def from_metadata(cls, meta: dict) -> "ChatTemplate":
        """Template from `tokenizer.chat_template`; bos/eos strings from the token list."""
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def tok(key: str) -> str:
            i = meta.get(key)
            return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""

        src = meta.get("tokenizer.chat_template")
        name = str(meta.get("general.name") or "model")
        if not src:
            log.info("%s has no tokenizer.chat_template; using ChatML", name)
        return cls(str(src) if src else None, tok("tokenizer.ggml.bos_token_id"),
                   tok("tokenizer.ggml.eos_token_id"), name)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> "Prompt":
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]): a str that also
        knows which parts are message text, so Tokenizer.encode keeps those plain (Prompt)."""
        return Prompt(self._render_text(messages, add_generation_prompt, extra), self, messages,
                      add_generation_prompt, extra)

    def _render_text(self, messages, add_generation_prompt, extra) -> str:
        _check_messages(messages)
        if self._template is None:
            raise ChatTemplateError(
                f"the chat template of {self.name} does not compile ({self._error}); pass a raw "
                "prompt instead of chat messages, or fix the template")
        ctx = dict(extra)
        ctx.update(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                   bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self._template.render(**ctx)
        except Exception as e:  # raise_exception(), undefined attributes, type errors, ...
            raise ChatTemplateError(
                f"the chat template of {self.name} failed on these messages: "
                f"{type(e).__name__}: {e}") from None

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               **extra) -> list[int]:
        """Token ids of the prompt for `messages`, where only the template's own text may hold
        special tokens (see Prompt)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt, **extra), add_bos=False)

    def _split(self, messages, add_generation_prompt, extra, text) -> list[tuple[str, bool]] | None:
        """[(piece, is_template_text)] whose concatenation is `text`, or None if the template
        treats the placeholders differently from the texts they stand for."""
        import re

        tag = "\ue000dsd%d\ue001"
        texts: list[str] = []

        def sub(c):
            texts.append(c)
            return tag % (len(texts) - 1)

        masked = []
        for m in messages:
            m = dict(m)
            c = m.get("content")
            if isinstance(c, str):
                m["content"] = sub(c)
            elif isinstance(c, list):
                m["content"] = [dict(p, text=sub(p["text"])) if isinstance(p, dict) and
                                isinstance(p.get("text"), str) else p for p in c]
            masked.append(m)
        try:
            rendered = self._render_text(masked, add_generation_prompt, extra)
        except DsdError:
            return None
        pieces, keys, pos = [], [], 0
        for mt in re.finditer("\ue000dsd(\\d+)\ue001", rendered):
            pieces.append(rendered[pos:mt.start()])
            keys.append(int(mt.group(1)))
            pos = mt.end()
        pieces.append(rendered[pos:])
        if any(k >= len(texts) for k in keys):
            return None
        # walk the real prompt: template piece, then the message text as the template wrote it
        # (itself, or trimmed: many templates apply `| trim`), then the next template piece
        parts: list[tuple[str, bool]] = []
        at = 0
        for i, k in enumerate(keys):
            if not text.startswith(pieces[i], at):
                return None
            parts.append((pieces[i], True))
            at += len(pieces[i])
            for cand in _written_forms(texts[k]):
                end = at + len(cand)
                if text.startswith(cand, at) and text.startswith(pieces[i + 1], end) and \
                        (i + 1 < len(keys) or end + len(pieces[i + 1]) == len(text)):
                    parts.append((cand, False))
                    at = end
                    break
            else:
                return None
        if text[at:] != pieces[-1]:
            return None
        parts.append((pieces[-1], True))
        return [p for p in parts if p[0]]


def _written_forms(t: str) -> list[str]:
    return list(dict.fromkeys([t, t.strip(), t.lstrip(), t.rstrip()]))


class Prompt(str):
    """A rendered chat prompt (a str) that knows which of its parts are message text.

    What users wrote ("hi<|im_end|>") must be tokenized as plain text, so it cannot forge a
    turn (llama.cpp's parse_special=false for user input); only the template's own markers are
    special.  Tokenizer.encode(prompt) asks split_user_text() for the parts: the template is
    rendered a second time with each message text replaced by a unique placeholder, and the
    placeholders cut the prompt into template text (special tokens on) and message text (off).
    A prompt whose messages hold no special-token text is tokenized in one piece, as before.
    Anything that rebuilds the string (slicing, +) gives a plain str, tokenized as written."""

    def __new__(cls, text, template, messages, add_generation_prompt, extra):
        self = super().__new__(cls, text)
        self._args = (template, messages, add_generation_prompt, extra)
        return self

    def split_user_text(self, specials: list[str]) -> list[tuple[str, bool]] | None:
        """[(text, parse_special)] for the tokenizer, or None when no message holds any of the
        special-token texts; DsdError when the template rewrites such a message."""
        template, messages, agp, extra = self._args
        user = _user_texts(messages)
        if not any(sp in u for u in user for sp in specials):
            return None
        for i, m in enumerate(messages):
            if any(sp in m["role"] for sp in specials):
                raise DsdError(f"chat message {i} has a role with control-token text "
                               f"({m['role']!r:.60}); use user, assistant, system or tool")
        parts = template._split(messages, agp, extra, str(self))
        if parts is None:
            raise DsdError(
                f"a chat message contains control-token text (e.g. {_first_special(user, specials)!r}) "
                f"and the chat template of {template.name} rewrites message text, so dsd cannot keep "
                f"it as plain text; remove it from the message or send a raw prompt")
        return parts


def _user_texts(messages) -> list[str]:
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def _first_special(texts, specials) -> str:
    return next((sp for t in texts for sp in specials if sp in t), "")


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DsdError("chat messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DsdError(f"chat message {i} must be a dict with a string 'role' (got {m!r:.80})")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise DsdError(f"chat message {i} ('{m['role']}') has content of type "
                           f"{type(c).__name__}; use a string")
