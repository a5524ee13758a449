"""dsd chat: session commands, multi-line input, and the one-shot mode through a pipe."""
from __future__ import annotations

import io

from dsd.commands.chat import ChatSession, read_message


class FakeClient:
    def __init__(self):
        self.calls = []

    def chat(self, messages, stream=False, **params):
        from dsd.client import Chunk

        self.calls.append((list(messages), dict(params)))
        yield Chunk("Hel")
        yield Chunk("lo", "stop", 5, 2)


def test_session_history_system_reset_and_set():
    fc = FakeClient()
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(fc, "be brief", {"temperature": 0.2}, out=out, err=err)
    assert s.ask("hi") == "Hello"
    assert out.getvalue() == "Hello\n"
    assert "2 tokens" in err.getvalue()
    s.ask("again")
    msgs, params = fc.calls[-1]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "Hello" and params == {"temperature": 0.2}
    assert s.command("/set temperature 0.7") and s.params["temperature"] == 0.7
    s.command("/set max_tokens 12")
    assert s.params["max_tokens"] == 12
    s.command("/system you are a pirate")
    assert s.system == "you are a pirate" and s.history == []
    s.ask("ahoy")
    s.command("/reset")
    assert s.history == [] and s.system == "you are a pirate"
    assert s.command("/quit") is False


def test_multiline_input():
    lines = iter(["first \\", "second", '"""', "a", "b", '"""', '"""one line"""'])
    ask = lambda prompt: next(lines)  # noqa: E731
    assert read_message(ask) == "first \nsecond"
    assert read_message(ask) == "a\nb"
    assert read_message(ask) == "one line"
    assert read_message(_eof) is None


def _eof(prompt):
    raise EOFError


def test_one_shot_through_a_pipe_matches_generate(tmp_path):
    from tests.test_daemon_util import dsd, running_daemon

    with running_daemon(tmp_path, "--nodes", "1") as run:
        piped = dsd(["chat", "--temperature", "0", "-n", "12"], run.env, input="What is 2+2?\n")
        arg = dsd(["chat", "What is 2+2?", "--temperature", "0", "-n", "12"], run.env)
        ref = dsd(["generate", "-c", "What is 2+2?", "--temperature", "0", "-n", "12"], run.env)
        assert piped.stdout == arg.stdout == ref.stdout
        assert piped.stdout.strip()
        st = dsd(["status"], run.env).stdout
        assert "worker 0: ready" in st and "KV cache" in st and "pages" in st
        import json

        js = json.loads(dsd(["status", "--json"], run.env).stdout)
        w = js["workers"][0]
        assert w["placement"]["bytes_by_node"] == {"0": w["placement"]["total"]}
        assert js["scheduler"]["completed"] >= 2
    p = dsd(["chat", "hi"], run.env, check=False)
    assert p.returncode == 1 and "dsd start" in p.stderr
