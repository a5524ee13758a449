"""Reasoning / tool-call parsing (daemon/reasoning.py, issue 18.8): each format's parser gives the
same events on the whole text and on the text cut anywhere; the HTTP API turns them into
reasoning_content and tool_calls, non-streaming and streaming; malformed calls stay content."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from dsd.daemon.reasoning import chat_format, make_parser

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}]
PARIS = {"city": "Paris", "days": 3}

# (format, think_open, text, expected events with tool-call ids left out)
SAMPLES = [
    ("think", False, "<think>\nThe user greets.\n</think>\n\nHello!",
     [("reasoning", "The user greets."), ("content", "Hello!")]),
    ("think", True, "Hmm, 2+2.\n</think>\n\n4", [("reasoning", "Hmm, 2+2."), ("content", "4")]),
    ("think", False, "No thinking here.", [("content", "No thinking here.")]),
    ("hermes", False, '<think>\nweather\n</think>\n\nLet me check.\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     [("reasoning", "weather"), ("content", "Let me check."), ("tool_call", ("get_weather", PARIS))]),
    ("hermes", False, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"days": 3}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "days": 3}}\n</tool_call>',
     [("tool_call", ("get_weather", PARIS)), ("tool_call", ("get_weather", PARIS))]),
    ("hermes", False, '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',
     [("content", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>')]),
    ("glm45", False, "\n<think>Paris, 3 days.</think>\nChecking.<tool_call>get_weather\n"
     "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
     "<arg_value>3</arg_value>\n</tool_call>",
     [("reasoning", "Paris, 3 days."), ("content", "Checking."), ("tool_call", ("get_weather", PARIS))]),
    ("glm45", False, "<tool_call>get_weather\n<arg_key>city</arg_key>junk</tool_call>",
     [("content", "<tool_call>get_weather\n<arg_key>city</arg_key>junk</tool_call>")]),
    ("kimi", False, 'Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
     '<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|>'
     '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Paris", '
     '"days": 3}<|tool_call_end|><|tool_calls_section_end|>',
     [("content", "Sure."), ("tool_call", ("get_weather", PARIS)), ("tool_call", ("get_weather", PARIS))]),
    ("kimi", False, '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
     '<|tool_call_argument_begin|>{"city": Paris}<|tool_call_end|><|tool_calls_section_end|>',
     [("content", '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                  '{"city": Paris}<|tool_call_end|>')]),
    ("harmony", False, "<|channel|>analysis<|message|>User asks 2+2.<|end|><|start|>assistant"
     "<|channel|>final<|message|>It is 4.", [("reasoning", "User asks 2+2."), ("content", "It is 4.")]),
    ("harmony", False, "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
     "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
     '{"city": "Paris", "days": 3}',
     [("reasoning", "Need weather."), ("tool_call", ("get_weather", PARIS))]),
    ("harmony", False, "<|channel|>commentary to=functions.get_weather <|constrain|>json"
     "<|message|>{not json", [("content", "{not json")]),
    ("harmony", False, "plain text, no markup", [("content", "plain text, no markup")]),
    ("plain", False, "<think>kept</think> as is ", [("content", "<think>kept</think> as is ")]),
]


def _norm(events):
    """Neighbouring texts of one kind joined; tool calls as (name, arguments object)."""
    out = []
    for kind, v in events:
        if kind == "tool_call":
            out.append((kind, (v["name"], json.loads(v["arguments"]))))
        elif out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + v)
        else:
            out.append((kind, v))
    return out


def _run(fmt, think_open, pieces, tools=TOOLS):
    p = make_parser({"name": fmt, "think_open": think_open}, tools)
    ev = []
    for piece in pieces:
        ev += p.feed(piece)
    return _norm(ev + p.finish())


@pytest.mark.parametrize("fmt,think_open,text,want", SAMPLES)
def test_parser_whole_and_split(fmt, think_open, text, want):
    assert _run(fmt, think_open, [text]) == want
    for i in range(len(text) + 1):                        # every single cut
        assert _run(fmt, think_open, [text[:i], text[i:]]) == want, i
    assert _run(fmt, think_open, list(text)) == want      # one character at a time
    rng = random.Random(len(text))
    for _ in range(30):                                   # random cuts into many pieces
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _run(fmt, think_open, pieces) == want, cuts


def test_no_tools_no_tool_parsing():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert _run("hermes", False, [text], tools=None) == [("content", text)]


def test_garbage_never_raises():
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                "<arg_value>", "</arg_value>", "<|channel|>", "<|message|>", "<|end|>", "<|start|>",
                " to=functions.f", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>",
                "{", "}", '"', "x", " ", "\n", ":", "<", "|"]
    for fmt in ("think", "hermes", "glm45", "kimi", "harmony"):
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            whole = _run(fmt, False, [text])
            assert _run(fmt, False, list(text)) == whole, (fmt, text)


def test_chat_format_detection():
    assert chat_format("...<|channel|>analysis...", "gpt-oss")["name"] == "harmony"
    assert chat_format(None, "gpt-oss")["name"] == "harmony"
    assert chat_format("<|tool_calls_section_begin|>", "deepseek2")["name"] == "kimi"
    assert chat_format("{{ '<|im_assistant|>assistant<|im_middle|>' }}", "deepseek2")["name"] == "kimi"
    assert chat_format("<tool_call>{{ name }}<arg_key>", "glm4moe")["name"] == "glm45"
    assert chat_format("<tool_call>\n{{ tool_call | tojson }}", "qwen3moe")["name"] == "hermes"
    assert chat_format("{{ '<think>' }}", "deepseek2")["name"] == "think"
    assert chat_format("<|im_start|>", "llama") == {"name": "plain", "think_open": False}
    assert chat_format("<think>", "deepseek2", "<|User|>x<|Assistant|><think>\n")["think_open"]


def test_templates_from_gguf_fixtures_render_tools():
    """The template gets `tools`; Qwen-style templates write them into the prompt."""
    from dsd.shard.chat_template import ChatTemplate
    src = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
           "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "<|im_start|>assistant\n<tool_call>")
    t = ChatTemplate(src)
    assert '"get_weather"' in t.render([{"role": "user", "content": "hi"}], tools=TOOLS)


# -- the HTTP API ------------------------------------------------------------------------------
class ScriptedBackend:
    """AsyncClient API emitting given text in given pieces (the real engine cannot be made to
    write markup): what tests/http_fake_backend.py does, minus the engine."""

    def __init__(self, fmt):
        self.fmt, self.pieces, self.calls = fmt, [], []

    async def chat(self, messages, stream=False, **kw):
        from dsd.client import Chunk
        self.calls.append((messages, kw))

        async def gen():
            for i, p in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                yield Chunk(p, "stop" if last else None, 7 if last else None, len(self.pieces) if last else None)
        return gen()

    async def model_info(self):
        return {"name": "scripted", "path": "/x/scripted.gguf", "context_length": 4096,
                "chat_format": self.fmt}

    async def status(self):
        return {"state": "ready"}


def _serve(fmt):
    from dsd.daemon.http_api import ServerThread, create_app
    be = ScriptedBackend(fmt)
    return be, ServerThread(create_app(be), "127.0.0.1", 0).start()


def _sse_events(resp):
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


HERMES = ['<think>\nThe user', ' wants weather.\n</thi', 'nk>\n\nLet me check.\n<tool_', 'call>\n{"name": ',
          '"get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>']
HARMONY = ["<|channel|>analysis<|message|>Need", " weather.<|end|><|start|>assistant<|channel|>commentary",
           " to=functions.get_weather <|constrain|>json<|message|>", '{"city": "Paris", "days": 3}']


@pytest.mark.parametrize("fmt,pieces", [("hermes", HERMES), ("harmony", HARMONY)])
def test_http_reasoning_and_tool_calls(fmt, pieces):
    be, srv = _serve({"name": fmt, "think_open": False})
    be.pieces = pieces
    body = {"model": "scripted", "messages": [{"role": "user", "content": "weather in Paris?"}],
            "tools": TOOLS}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            assert ch["finish_reason"] == "tool_calls"
            msg = ch["message"]
            assert msg["reasoning_content"].startswith("Need weather") or \
                msg["reasoning_content"] == "The user wants weather."
            assert "<" not in (msg["content"] or "")
            (call,) = msg["tool_calls"]
            assert call["type"] == "function" and call["id"]
            assert call["function"]["name"] == "get_weather"
            assert json.loads(call["function"]["arguments"]) == PARIS
            _, kw = be.calls[-1]
            assert kw["raw"] and kw["keep_special"] and kw["tools"] == TOOLS

            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                evs = _sse_events(r)
            deltas = [e["choices"][0]["delta"] for e in evs if e["choices"]]
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            content = "".join(d.get("content") or "" for d in deltas)
            calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
            assert reasoning == msg["reasoning_content"] and content == (msg["content"] or "")
            assert len(calls) == 1 and calls[0]["index"] == 0
            assert json.loads(calls[0]["function"]["arguments"]) == PARIS
            assert evs[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        srv.stop()


def test_http_malformed_tool_call_is_content_and_openai_sdk_reads_reasoning():
    import openai
    be, srv = _serve({"name": "hermes", "think_open": True})
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    be.pieces = ["Think", "ing.</think>", "\n\n", bad[:9], bad[9:]]
    try:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = oai.chat.completions.create(model="scripted", tools=TOOLS,
                                        messages=[{"role": "user", "content": "hi"}])
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and not m.tool_calls
        assert m.content == bad and m.model_extra["reasoning_content"] == "Thinking."
        parts = list(oai.chat.completions.create(model="scripted", tools=TOOLS, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == bad
        assert parts[-1].choices[0].finish_reason == "stop"
        # history with a tool call and its result goes back to the template
        oai.chat.completions.create(model="scripted", tools=TOOLS, messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
        msgs, _ = be.calls[-1]
        assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
        assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    finally:
        srv.stop()


def test_plain_model_without_tools_passes_nothing_new():
    be, srv = _serve(None)
    be.pieces = ["<think>x</think> hi"]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
        assert r.json()["choices"][0]["message"]["content"] == "<think>x</think> hi"
        assert be.calls[-1][1] == {"max_tokens": 4096}
    finally:
        srv.stop()


# -- the Python client and dsd chat --------------------------------------------------------------
def test_client_parses_and_chat_shows_reasoning_apart():
    import io

    from dsd.client import Chunk, Client, Result
    from dsd.commands.chat import ChatSession

    class Fake(Client):
        def __init__(self):
            self.sent = []

        def model_info(self):
            return {"chat_format": {"name": "think", "think_open": False}}

        def _run(self, msg, stream):
            self.sent.append(msg)
            if not stream:
                return Result("<think>hm</think>Yes.", "stop", 3, 4)
            return iter([Chunk("<think>h"), Chunk("m</think>Y"), Chunk("es.", "stop", 3, 4)])

    c = Fake()
    r = c.chat([{"role": "user", "content": "q"}])
    assert (r.text, r.reasoning, r.tool_calls) == ("Yes.", "hm", None)
    assert c.sent[-1]["keep_special"] is True
    out = io.StringIO()
    s = ChatSession(c, None, {}, out=out, err=io.StringIO())
    assert s.ask("q") == "Yes."
    assert out.getvalue() == "thinking: hm\nYes.\n"
    assert s.history[-1] == {"role": "assistant", "content": "Yes."}


def test_daemon_request_renders_tools_and_keeps_special_tokens():
    """daemon/requests.py: `tools` reach the template, keep_special reaches the detokenizer, and
    model_info names the chat format (the real default model's tokenizer)."""
    from types import SimpleNamespace

    from dsd.daemon.requests import build_request, chat_format as daemon_format
    from dsd.shard.chat_template import ChatTemplate
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.model_path import default_model_path
    from dsd.shard.tokenizer import Tokenizer

    g = open_gguf(default_model_path())
    tok = Tokenizer.from_metadata(g.metadata)
    src = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}{% endfor %}</tools>{% endif %}"
           "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "<|im_start|>assistant\n<think>\n")
    d = SimpleNamespace(template=ChatTemplate(src), tokenizer=tok, context=4096, vocab=tok.vocab_size,
                        gguf=SimpleNamespace(architecture="qwen3"))
    msg = {"id": "r1", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
           "keep_special": True}
    req, err = build_request(d, b"c", msg)
    assert err is None and req.keep_special
    assert "<tools>get_weather</tools>" in tok.decode(req.prompt_ids)
    req2, _ = build_request(d, b"c", {"id": "r2", "messages": msg["messages"]})
    assert not req2.keep_special and "<tools>" not in tok.decode(req2.prompt_ids)
    assert build_request(d, b"c", {**msg, "tools": "x"})[1].startswith("tools must be")
    assert daemon_format(d) == {"name": "think", "think_open": True}
    special = next(i for i in sorted(tok._special) if tok.tokens[i])
    keep, drop = tok.decoder(skip_special=False), tok.decoder()
    assert keep.push(special) == tok.tokens[special] and drop.push(special) == ""
