"""Issue 17 point 6: HTTP never answers 500 to a client's mistake and never waits forever.

In-process (a stub backend behind the real uvicorn server on a loopback port): huge integers,
lone surrogates and deep nesting are 400s; a body or headers that never arrive time out (408,
OpenAI-style JSON); uvicorn's own answer to malformed HTTP is OpenAI-style JSON; a worker death
is 503 with Retry-After; one endpoint label per route in /metrics, streamed or not.
With a real daemon: a taken port or a malformed --http fails `dsd start` with the reason and
leaves nothing behind; the API key is in no process's command line."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest

from dsd.client import RequestFailed
from dsd.daemon.http_api import ServerThread, create_app
from tests.test_daemon_util import alive, dsd, running_daemon, shm_segments, wait_for
from tests.test_http_units import StubBackend


@pytest.fixture
def server():
    app = create_app(StubBackend())
    app.state.api.body_timeout = 1.0
    srv = ServerThread(app, "127.0.0.1", 0, header_timeout=1.0).start()
    try:
        yield srv
    finally:
        srv.stop()


def _raw(srv, data: bytes, wait: float = 20.0) -> bytes:
    """Send data, then read until the server closes the connection."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=wait)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                raise AssertionError(f"the server held the connection for {wait} s: {out!r}")
            if not b:
                return out
            out += b
    finally:
        s.close()


def _json_error(resp: bytes, status: int) -> dict:
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), resp[:200]
    assert b"application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 30 + b"}",
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
])
def test_client_mistakes_are_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_that_never_arrives_times_out(server):
    resp = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"prompt\":")
    err = _json_error(resp, 408)
    assert err["code"] == "request_timeout" and "did not arrive" in err["message"]


def test_headers_that_never_arrive_time_out(server):
    err = _json_error(_raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"), 408)
    assert err["code"] == "request_timeout" and "headers" in err["message"]
    assert _raw(server, b"") == b""        # an idle connection is closed, not kept


def test_malformed_http_gets_json(server):
    err = _json_error(_raw(server, b"NOT HTTP AT ALL\r\n\r\n"), 400)
    assert err["code"] == "bad_http_request"
    err = _json_error(_raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"), 400)
    assert err["code"] == "bad_http_request"
    r = httpx.get(server.url + "/health", timeout=10)    # and the server still serves
    assert r.status_code == 200


def test_worker_death_is_503_with_retry_after():
    class Dying(StubBackend):
        async def _gen(self):
            e = RequestFailed("worker 0 (pid 1) died while serving this request; the daemon is "
                              "restarting it, retry the request")
            e.retry_after = 6.5
            raise e
            yield  # pragma: no cover

    async def go():
        app = create_app(Dying())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503 and r.headers["retry-after"] == "7"
            assert r.json()["error"]["code"] == "worker_restarting"
            plain = StubBackend(fail="mid")   # a failure a retry will not cure stays a 500
            app2 = create_app(plain)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app2), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 500 and "retry-after" not in r.headers
    asyncio.run(go())


def test_one_endpoint_label_per_route():
    async def go():
        app = create_app(StubBackend())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            msgs = {"messages": [{"role": "user", "content": "x"}]}
            assert (await c.post("/v1/chat/completions", json=msgs)).status_code == 200
            assert (await c.post("/v1/chat/completions", json={**msgs, "stream": True})).status_code == 200
            assert (await c.post("/v1/completions", json={"prompt": "x", "stream": True})).status_code == 200
            text = (await c.get("/metrics")).text
        lines = [x for x in text.splitlines() if x.startswith("dsd_http_requests_total{")]
        assert 'dsd_http_requests_total{code="200",endpoint="chat_completions"} 2' in lines, lines
        assert 'dsd_http_requests_total{code="200",endpoint="completions"} 1' in lines, lines
        assert not any('endpoint="chat"' in x for x in lines), lines
    asyncio.run(go())


# -- with a real daemon ----------------------------------------------------------------------------
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_taken_port_and_bad_http_fail_start_and_leave_nothing(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with running_daemon(tmp_path, start=False) as run:
            p = dsd(["start", "--http", f"127.0.0.1:{port}"], run.env, check=False, timeout=300)
            assert p.returncode == 1 and "dsd: ready" not in p.stderr, p.stderr
            assert f"cannot listen for HTTP on 127.0.0.1:{port}" in p.stderr, p.stderr
            assert not os.path.exists(run.sock_dir) or os.listdir(run.sock_dir) == []
            assert shm_segments(run.instance) == []
            assert not any(alive(x) for x in run.remember_pids())
            p = dsd(["start", "--http", "localhost:http"], run.env, check=False, timeout=60)
            assert p.returncode == 1 and "the port must be a number" in p.stderr, p.stderr
            assert "starting daemon" not in p.stderr       # refused before anything started
    finally:
        taken.close()


def _cmdlines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
            except OSError:
                pass
    return out


def test_api_key_file_never_in_a_command_line_and_worker_death_503(tmp_path):
    key = "k-" + os.urandom(8).hex()
    kf = tmp_path / "key"
    kf.write_text(key + "\n")
    port = _free_port()
    with running_daemon(tmp_path, "--http", f"127.0.0.1:{port}", "--api-key-file", str(kf)) as run:
        assert not any(key in c for c in _cmdlines())
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth, timeout=30).status_code == 200
        worker = run.client().status()["workers"][0]["pid"]
        box = {}

        def ask():
            box["r"] = httpx.post(url + "/v1/completions", headers=auth, timeout=120, json={
                "prompt": "The history of Rome", "max_tokens": 3000, "ignore_eos": True,
                "temperature": 0})

        t = threading.Thread(target=ask)
        t.start()
        wait_for(lambda: run.client().status()["scheduler"]["active"] == 1, 60, "the request to start")
        time.sleep(0.5)
        os.kill(worker, 9)
        t.join(60)
        r = box["r"]
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "worker_restarting"
        wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 200, 120, "the restart")
