"""Reasoning and tool-call markup in generated text, parsed incrementally (issue 18.8).

Reasoning and agent models write their thinking and their tool calls as markup in the text:
  think    <think>...</think> then the answer (Qwen3, DeepSeek R1, GLM-4.5, Kimi K2 Thinking);
           some templates end the prompt with <think> (think_open: the output starts inside it)
  hermes   think + <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen2.5/Qwen3)
  glm45    think + <tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...</tool_call>
  kimi     think + <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
           <|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>
  harmony  gpt-oss: <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
           <|message|>...; tool calls <|channel|>commentary to=functions.NAME <|constrain|>json
           <|message|>{...} (then <|call|>, an end-of-generation token the parser never sees)
  plain    everything is content
A parser is fed text in pieces (a marker may be split across them) and gives events:
("content", text), ("reasoning", text), ("tool_call", {"id", "name", "arguments": JSON text}).
The same text gives the same events (after joining neighbouring texts of one kind) however it
is cut.  Tool calls are parsed only when the request offered tools; a call whose body does not
parse comes out as content, markup included.  Whitespace at the start and end of each
reasoning / content section is dropped (as llama.cpp trims them).
"""
from __future__ import annotations

import json
import re
import uuid

PARSERS: dict[str, type] = {}


def register(cls):
    PARSERS[cls.name] = cls
    return cls


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class Parser:
    """Base: a buffer of unparsed text and a state machine run over it by `_run`."""
    name = "plain"
    trim = False                 # drop whitespace at both ends of each section

    def __init__(self, tools: list | None = None, think_open: bool = False):
        self.tools = {}
        for t in tools or []:
            f = t.get("function", t) if isinstance(t, dict) else None
            if isinstance(f, dict) and isinstance(f.get("name"), str):
                self.tools[f["name"]] = f
        self.buf = ""
        self.out: list = []
        self.kind = None          # kind of the open text section ("content" / "reasoning")
        self.ws = ""              # whitespace held back at the end of the open section
        self.lead = True          # the open section has emitted nothing yet

    # -- public ----------------------------------------------------------------------------
    def feed(self, text: str) -> list:
        self.buf += text
        self._run(False)
        return self._take()

    def finish(self) -> list:
        self._run(True)
        self._end()
        return self._take()

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        self._text("content", self.buf)
        self.buf = ""

    def _take(self) -> list:
        out, self.out = self.out, []
        return out

    def _text(self, kind: str, s: str) -> None:
        if kind != self.kind:
            self._end()
            self.kind = kind
        if not self.trim:
            if s:
                self._event(kind, s)
            return
        if self.lead:
            s = s.lstrip()
        if not s:
            return
        s = self.ws + s
        core = s.rstrip()
        self.ws = s[len(core):]
        if core:
            self.lead = False
            self._event(kind, core)

    def _end(self) -> None:
        """Close the open text section (its trailing whitespace is dropped)."""
        self.kind, self.ws, self.lead = None, "", True

    def _event(self, kind: str, value) -> None:
        if kind != "tool_call" and self.out and self.out[-1][0] == kind:
            self.out[-1] = (kind, self.out[-1][1] + value)
        else:
            self.out.append((kind, value))

    def _call(self, name, args, raw: str, call_id: str | None = None) -> None:
        """A parsed tool call, or (name/arguments malformed) its raw markup as content."""
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(name, str) or not name.strip() or not isinstance(args, dict):
            self._text("content", raw)
            return
        self._end()
        self._event("tool_call", {"id": call_id or new_call_id(), "name": name.strip(),
                                  "arguments": json.dumps(args, ensure_ascii=False)})

    def _upto(self, kind: str, markers: tuple, final: bool):
        """Emit buf as `kind` up to the first marker: (marker, text after it), or None after
        emitting all that cannot start a marker (all of it when final)."""
        hits = [(i, m) for m in markers if (i := self.buf.find(m)) >= 0]
        if hits:
            i, m = min(hits)
            self._text(kind, self.buf[:i])
            self.buf = self.buf[i + len(m):]
            return m
        keep = 0 if final else _partial(self.buf, markers)
        self._text(kind, self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return None


def _partial(s: str, markers) -> int:
    """Length of the longest end of s that is the start of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(s)), best, -1):
            if s.endswith(m[:n]):
                best = n
                break
    return best


register(Parser)


@register
class ThinkParser(Parser):
    """<think>...</think> at the start, then content (tool calls: see subclasses)."""
    name = "think"
    trim = True
    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, tools=None, think_open=False):
        super().__init__(tools, think_open)
        self.state = "reasoning" if think_open else "start"

    def _run(self, final: bool) -> None:
        while True:
            before = (self.state, len(self.buf))
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(self.OPEN):
                    self.buf, self.state = s[len(self.OPEN):], "reasoning"
                elif not final and (not s or self.OPEN.startswith(s)):
                    return
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self._upto("reasoning", (self.CLOSE,), final):
                    self._end()
                    self.state = "content"
            else:
                self._content(final)
            if (self.state, len(self.buf)) == before:
                return

    def _content(self, final: bool) -> None:
        self._text("content", self.buf)
        self.buf = ""


class _TaggedCalls(ThinkParser):
    """Content with tool calls between BEGIN and END (only when the request has tools)."""
    BEGIN, END = "<tool_call>", "</tool_call>"

    def _content(self, final: bool) -> None:
        if not self.tools:
            return super()._content(final)
        if self.state == "content":
            if self._upto("content", (self.BEGIN,), final):
                self.state = "call"
            return
        i = self.buf.find(self.END)
        if i < 0 and not final:
            return
        body, self.buf = (self.buf[:i], self.buf[i + len(self.END):]) if i >= 0 else (self.buf, "")
        self.state = "content"
        self._body(body, self.BEGIN + body + (self.END if i >= 0 else ""))

    def _body(self, body: str, raw: str) -> None:
        raise NotImplementedError


@register
class HermesParser(_TaggedCalls):
    name = "hermes"

    def _body(self, body, raw):
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return self._text("content", raw)
        self._call(obj.get("name"), obj.get("arguments", obj.get("parameters", {})), raw)


_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


@register
class Glm45Parser(_TaggedCalls):
    name = "glm45"

    def _body(self, body, raw):
        name, _, rest = body.partition("<arg_key>")
        rest = "<arg_key>" + rest if _ else ""
        args, end = {}, 0
        props = (self.tools.get(name.strip(), {}).get("parameters") or {}).get("properties") or {}
        for m in _GLM_ARG.finditer(rest):
            if rest[end:m.start()].strip():
                return self._text("content", raw)
            end = m.end()
            k, v = m.group(1).strip(), m.group(2)
            if (props.get(k) or {}).get("type") == "string":
                args[k] = v           # the template writes strings raw, the rest as JSON
            else:
                try:
                    args[k] = json.loads(v)
                except ValueError:
                    args[k] = v
        if rest[end:].strip() or "\n" in name.strip():
            return self._text("content", raw)
        self._call(name, args, raw)


@register
class KimiParser(ThinkParser):
    name = "kimi"
    SEC, SEC_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    CALL, ARG, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

    def _content(self, final):
        if not self.tools:
            return super()._content(final)
        if self.state == "content":
            if self._upto("content", (self.SEC,), final):
                self.state = "section"
            return
        hits = [(i, m) for m in (self.CALL_END, self.SEC_END) if (i := self.buf.find(m)) >= 0]
        if not hits and not final:
            return
        i, m = min(hits) if hits else (len(self.buf), "")
        part, self.buf = self.buf[:i], self.buf[i + len(m):]
        if m == self.SEC_END or not m:
            self.state = "content"
            if part.strip():
                self._one(part, m == self.CALL_END)
        else:
            self._one(part, True)

    def _one(self, part: str, closed: bool) -> None:
        raw = part + (self.CALL_END if closed else "")
        s = part.strip()
        head, sep, args = s[len(self.CALL):].partition(self.ARG)
        if not s.startswith(self.CALL) or not sep:
            return self._text("content", raw)
        head = head.strip()           # functions.NAME:IDX, the id the template writes back
        name = head.split(":")[0]
        name = name[len("functions."):] if name.startswith("functions.") else name
        self._call(name, args, raw, head)


@register
class HarmonyParser(Parser):
    """gpt-oss: messages of a header (<|channel|>NAME, to=RECIPIENT, <|constrain|>json) and a
    body ended by <|end|> (or <|call|> / <|return|>: end of generation) or a new <|start|>."""
    name = "harmony"
    trim = True
    MSG, START = "<|message|>", "<|start|>"
    ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
    HEADS = ("<|channel|>", "assistant", " to=", "to=", "<|start|>", "<|constrain|>")

    def __init__(self, tools=None, think_open=False):
        super().__init__(tools, think_open)
        self.state, self.channel, self.to, self.body = "header", "", None, ""

    def _run(self, final: bool) -> None:
        while True:
            before = (self.state, len(self.buf))
            if self.state == "header":
                self._header(final)
            elif self.state == "raw":      # no harmony markup at all: everything is content
                self._text("content", self.buf)
                self.buf = ""
            else:
                self._body(final)
            if (self.state, len(self.buf)) == before:
                return

    def _header(self, final):
        s = self.buf.lstrip()
        if not s:
            return
        if not any(s.startswith(h) or h.startswith(s) for h in self.HEADS):
            self.state = "raw"
            return
        i = self.buf.find(self.MSG)
        if i < 0:
            if final:
                self.buf = ""
            return
        head, self.buf = self.buf[:i], self.buf[i + len(self.MSG):]
        m = re.search(r"<\|channel\|>\s*(\w+)", head)
        self.channel = m.group(1) if m else "final"
        to = re.search(r"to=(\S+?)(?=<\||\s|$)", head)
        self.to = to.group(1) if to else None
        self.state, self.body = "body", ""

    def _body(self, final):
        if self.to is not None:
            hits = [(i, m) for m in self.ENDS if (i := self.buf.find(m)) >= 0]
            if not hits and not final:
                keep = _partial(self.buf, self.ENDS)
                self.body += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return
            i, m = min(hits) if hits else (len(self.buf), "")
            self.body += self.buf[:i]
            self.buf = self.buf[i + len(m):]
            name = self.to[len("functions."):] if self.to.startswith("functions.") else self.to
            if self.tools and self.to.startswith("functions."):
                self._call(name, self.body, self.body)
            else:
                self._text("content", self.body)
                self._end()
        else:
            kind = "reasoning" if self.channel == "analysis" else "content"
            if self._upto(kind, self.ENDS, final) is None and not final:
                return
            self._end()
        self.state = "header"


def chat_format(template_source: str | None, architecture: str | None = None,
                generation_prompt: str = "") -> dict:
    """{"name": parser name, "think_open": bool} for a model, from its chat template (the
    markup it writes), else its architecture; generation_prompt: the template rendered for one
    user message with add_generation_prompt (does it end inside a <think>?)."""
    src = template_source or ""
    arch = (architecture or "").lower()
    if "<|channel|>" in src or arch == "gpt-oss":
        name = "harmony"
    elif "<|tool_calls_section_begin|>" in src or "<|im_middle|>" in src:   # Kimi K2
        name = "kimi"
    elif "<arg_key>" in src or (not src and arch == "glm4moe"):
        name = "glm45"
    elif "<tool_call>" in src or (not src and arch in ("qwen3", "qwen3moe")):
        name = "hermes"
    elif "<think>" in src:
        name = "think"
    else:
        name = "plain"
    return {"name": name, "think_open": generation_prompt.rstrip().endswith("<think>")}


def describe_template(template, architecture: str | None = None) -> dict:
    """chat_format() for a dsd.shard.chat_template.ChatTemplate."""
    try:
        gen = str(template.render([{"role": "user", "content": "x"}], add_generation_prompt=True))
    except Exception:   # a template that cannot render a plain message: no forced <think>
        gen = ""
    return chat_format(None if template.is_fallback else template.source, architecture, gen)


def make_parser(fmt: dict | str | None, tools: list | None = None) -> Parser:
    """The parser for a chat_format() result (or a parser name); unknown names: plain."""
    if not isinstance(fmt, dict):
        fmt = {"name": fmt or "plain"}
    return PARSERS.get(fmt.get("name"), Parser)(tools, bool(fmt.get("think_open")))


def needs_special(fmt: dict | str | None) -> bool:
    """Must the detokenizer keep special tokens for this format? (Its markers are special
    tokens in some conversions: gpt-oss's and Kimi's always, GLM's <tool_call> and friends.)"""
    name = fmt.get("name") if isinstance(fmt, dict) else fmt
    return name not in (None, "plain")
