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


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    from markupsafe import Markup

    return Markup(json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                             sort_keys=sort_keys))


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

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
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
