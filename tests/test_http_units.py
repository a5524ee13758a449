"""HTTP API pieces that need no model: address parsing, status flattening, and the app's
handling of backends that fail or answer in the other shapes the client API allows (chunks as
dicts, coroutines returning iterators), through httpx's in-process ASGI transport."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dsd.daemon.http_api import (DaemonNotRunning, InvalidRequest, RequestFailed, create_app,
                                 is_loopback, parse_http_address)
from dsd.daemon.http_metrics import Metrics, flatten_status
from dsd.errors import DsdError


@pytest.mark.parametrize("spec,want", [
    (None, ("127.0.0.1", 8080)),
    ("9000", ("127.0.0.1", 9000)),
    (":9000", ("127.0.0.1", 9000)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("localhost:8081", ("localhost", 8081)),
    ("[::1]:8082", ("::1", 8082)),
])
def test_parse_http_address(spec, want):
    assert parse_http_address(spec) == want


@pytest.mark.parametrize("spec", ["abc", "1.2.3.4:", "host:99999", "[::1]8080", "-1"])
def test_parse_http_address_errors(spec):
    with pytest.raises(DsdError, match="--http"):
        parse_http_address(spec)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_flatten_status_labels_and_info():
    st = {"state": "ready", "pid": 7, "log_file": "/x", "scheduler": {"queued": 2, "ok": True},
          "workers": [{"index": 0, "node": 1, "cpus": [0, 1], "weight_bytes": 5,
                       "page_kinds": {"2m": 4}}]}
    got = {(n, tuple(sorted(l.items()))): v for n, l, v in flatten_status(st)}
    assert got == {
        ("dsd_daemon_state_info", (("value", "ready"),)): 1,
        ("dsd_daemon_scheduler_queued", ()): 2,
        ("dsd_daemon_scheduler_ok", ()): True,
        ("dsd_daemon_workers_weight_bytes", (("index", "0"), ("node", "1"))): 5,
        ("dsd_daemon_workers_page_kinds_2m", (("index", "0"), ("node", "1"))): 4,
    }


def test_metrics_render_is_prometheus_text():
    m = Metrics()
    m.request_done("completions", 200)
    m.tokens(10, 5, 2.0)
    text = m.render({"scheduler": {"queued": 3}, "workers": [
        {"index": 0, "node": 0, "weight_bytes": 100, "page_kinds": {"1g": 100},
         "placement": {"bytes_by_node": {"0": 60, "1": 40}}}]})
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    for x in lines:   # name{labels} value
        name, value = x.rsplit(" ", 1)
        float(value)
        assert name.replace("{", " ").split()[0].replace("_", "a").isalnum()
    assert 'dsd_http_requests_total{code="200",endpoint="completions"} 1' in lines
    assert 'dsd_decode_tokens_per_second{window="last"} 2.0' in lines
    assert "dsd_queue_depth 3" in lines
    assert 'dsd_node_page_bytes{node="0",page_size="1g",worker="0"} 100' in lines
    assert 'dsd_numa_node_weight_bytes{node="1"} 40' in lines
    assert "dsd_daemon_up 1" in lines
    assert "dsd_daemon_up 0" in m.render(None, "DaemonNotRunning: no daemon")


# -- stub backends -------------------------------------------------------------------------------
class StubBackend:
    """Answers with fixed chunks. Mode 'coro': chat() is a coroutine returning the iterator (as
    the brief describes); mode 'agen': chat() returns the async generator itself (as
    dsd.client.AsyncClient does). Chunks are dicts here to exercise the duck typing."""

    def __init__(self, mode="agen", texts=("Hel", "lo", "!"), fail=None, status_exc=None):
        self.mode, self.texts, self.fail, self.status_exc = mode, texts, fail, status_exc
        self.closed = 0
        self.calls = []

    async def _gen(self):
        try:
            if self.fail == "first":
                raise InvalidRequest("prompt has 9999 tokens but the context holds 4096; shorten it")
            for i, t in enumerate(self.texts):
                if self.fail == "mid" and i == 1:
                    raise RequestFailed("worker 1 died")
                last = i == len(self.texts) - 1
                yield {"text": t, "finish_reason": "stop" if last else None,
                       "prompt_tokens": 7 if last else None,
                       "completion_tokens": len(self.texts) if last else None}
                await asyncio.sleep(0)
        finally:
            self.closed += 1

    def chat(self, messages, stream=False, **kw):
        self.calls.append(("chat", messages, kw))
        if self.fail == "down":
            raise DaemonNotRunning("no dsd daemon is running; start one with `dsd start`")
        if self.mode == "coro":
            async def coro():
                return self._gen()
            return coro()
        return self._gen()

    def generate(self, prompt, stream=False, **kw):
        self.calls.append(("generate", prompt, kw))
        return self.chat([], stream, **kw)

    async def status(self):
        if self.status_exc:
            raise self.status_exc
        return {"state": "ready", "scheduler": {"queued": 0, "active": 0}}

    async def model_info(self):
        return {"path": "/models/Tiny-Model.Q8_0.gguf", "name": "Tiny", "context": 4096}


def client_for(backend, **kw):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(backend, **kw)),
                             base_url="http://test")


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("mode", ["agen", "coro"])
def test_stub_chat_both_call_shapes(mode):
    b = StubBackend(mode)

    async def go():
        async with client_for(b) as c:
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]},
                             {"role": "user", "content": "hi"}],
                "stop": "x", "seed": -1, "top_p": 0, "max_tokens": 9})
            assert r.status_code == 200, r.text
            j = r.json()
            assert j["model"] == "Tiny-Model.Q8_0"
            assert j["choices"][0]["message"]["content"] == "Hello!"
            assert j["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                  "prompt_tokens_details": {"cached_tokens": 0}}
            s = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "stream_options": {"include_usage": True}})
            events = [e[6:] for e in s.text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            objs = [json.loads(e) for e in events[:-1]]
            assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"]) == "Hello!"
            assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] == 10
            m = await c.get("/v1/models")
            assert m.json()["data"][0]["context_length"] == 4096
    run(go())
    # without max_tokens the request may run to the end of the context
    assert b.calls[1][2] == {"max_tokens": 4096}
    # developer -> system, text parts joined; OpenAI fields mapped to SamplingParams names
    assert b.calls[0][1] == [{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}]
    assert b.calls[0][2] == {"stop": ["x"], "seed": 2 ** 64 - 1, "top_k": 1, "max_tokens": 9}
    assert b.closed == 2


def test_stub_failures_map_to_openai_errors():
    async def go():
        async with client_for(StubBackend(fail="first")) as c:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "stream": True})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "messages"
        async with client_for(StubBackend(fail="down")) as c:
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "daemon_not_running"
        b = StubBackend(fail="mid")
        async with client_for(b) as c:
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed"
            s = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
            assert s.status_code == 200       # headers were sent: the error comes in-band
            events = [e[6:] for e in s.text.split("\n\n") if e]
            assert json.loads(events[-2])["error"]["message"] == "worker 1 died"
            assert events[-1] == "[DONE]"
            m = (await c.get("/metrics")).text
            assert "dsd_http_requests_in_flight 0" in m
    run(go())


def test_stub_health_and_metrics_when_daemon_down():
    async def go():
        b = StubBackend(status_exc=DaemonNotRunning("no dsd daemon is running"))
        async with client_for(b, model_name="m") as c:
            h = await c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "unavailable"
            assert h.json()["error"]["code"] == "daemon_not_running"
            m = await c.get("/metrics")
            assert m.status_code == 200 and "dsd_daemon_up 0" in m.text
            assert (await c.get("/v1/models")).json()["data"][0]["id"] == "m"

        class Loading(StubBackend):
            async def status(self):
                return {"state": "starting"}
        async with client_for(Loading()) as c:
            h = await c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "starting"
    run(go())


def test_unexpected_backend_exception_is_a_json_500():
    class Broken(StubBackend):
        def generate(self, prompt, stream=False, **kw):
            raise ZeroDivisionError("boom")

    async def go():
        async with client_for(Broken()) as c:
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
            assert (await c.get("/health")).status_code == 200
    run(go())


def test_small_body_limit_and_echo():
    async def go():
        async with client_for(StubBackend(), max_body_bytes=100) as c:
            r = await c.post("/v1/completions", json={"prompt": "x" * 200})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            r = await c.post("/v1/completions", json={"prompt": "Say: ", "echo": True})
            assert r.json()["choices"][0]["text"] == "Say: Hello!"
    run(go())


def test_server_thread_binds_loopback_and_reports_busy_port():
    from dsd.daemon.http_api import ServerThread

    import socket

    srv = ServerThread(create_app(StubBackend(), model_name="m"), "127.0.0.1", 0).start()
    # asyncio only sets TCP_NODELAY on connections accepted from an IPPROTO_TCP socket (with
    # proto 0, every response waited ~40 ms for a delayed ACK)
    assert srv.sock.proto == socket.IPPROTO_TCP
    try:
        assert httpx.get(srv.url + "/health", timeout=30).json() == {"status": "ok"}
        with pytest.raises(DsdError, match="cannot listen for HTTP on 127.0.0.1"):
            ServerThread(create_app(StubBackend()), "127.0.0.1", srv.port)
    finally:
        srv.stop()
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=5)


def test_server_thread_ipv6_loopback():
    import socket

    from dsd.daemon.http_api import ServerThread

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        have_v6 = True
    except OSError:
        have_v6 = False
    if not have_v6:   # no IPv6 loopback here: the error names the address and the fix
        with pytest.raises(DsdError, match="--http HOST:PORT"):
            ServerThread(create_app(StubBackend()), "[::1]", 0)
        return
    srv = ServerThread(create_app(StubBackend(), model_name="m"), "[::1]", 0).start()
    try:
        assert srv.url.startswith("http://[::1]:")
        assert httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "m"
    finally:
        srv.stop()
