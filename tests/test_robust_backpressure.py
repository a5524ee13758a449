"""Issue 17 point 11: a bounded queue (past it: busy, HTTP 429 with Retry-After), per-request
deadlines (`timeout` in the client and the API), queue depth and waits in status and /metrics."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from dsd.client import DaemonBusy, RequestFailed, RequestTimeout
from dsd.daemon.admission import Admission
from dsd.daemon.http_api import create_app
from tests.test_daemon_util import running_daemon, wait_for
from tests.test_http_units import StubBackend


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_admission_bounds_expires_and_counts():
    c = Clock()
    a = Admission(max_batch=2, max_queue=1, default_timeout=0, clock=c)
    assert [a.admit(b"c", f"r{i}", None) for i in range(4)] == [True, True, True, False]
    assert a.rejected == 1 and a.stats()["in_flight"] == 3 and a.stats()["waiting"] == 3
    assert 1.0 <= a.retry_after() <= 120
    c.t = 2.0
    a.on_reply(b"c", {"type": "chunk", "id": "r0", "text": "x", "finish_reason": None})
    a.on_reply(b"c", {"type": "chunk", "id": "r0", "text": "y", "finish_reason": "stop"})
    a.on_reply(b"c", {"type": "error", "id": "r1", "kind": "failed", "message": "m"})
    st = a.stats()
    assert st["in_flight"] == 1 and st["first_token_wait_s_p50"] == 2.0
    assert a.admit(b"c", "t", 5.0) and a.expired() == []
    c.t = 7.5
    assert a.expired() == [(b"c", "t", 5.0)] and a.timed_out == 1
    a.forget(b"c", "r2")
    assert a.stats()["in_flight"] == 0


def test_http_maps_busy_to_429_and_timeout_to_504():
    class Busy(StubBackend):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        async def _gen(self):
            raise self.exc
            yield  # pragma: no cover

    busy = DaemonBusy("the daemon is busy")
    busy.retry_after = 2.2

    async def go():
        for exc, status, code in ((busy, 429, "daemon_busy"), (RequestTimeout("late"), 504, "timeout")):
            app = create_app(Busy(exc))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v1/completions", json={"prompt": "x", "timeout": 3})
                assert r.status_code == status and r.json()["error"]["code"] == code
                if status == 429:
                    assert r.headers["retry-after"] == "3"
                r = await c.post("/v1/completions", json={"prompt": "x", "timeout": -1})
                assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"
    asyncio.run(go())


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_daemon_queue_limit_timeout_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_MAX_QUEUE", "1")
    port = _free_port()
    with running_daemon(tmp_path, "--max-batch", "1", "--http", f"127.0.0.1:{port}") as run:
        c = run.client(timeout=30)
        stop = threading.Event()
        started = []

        def long_stream():
            try:
                for _ in c.generate("Tell me a long story", stream=True, max_tokens=3000, ignore_eos=True):
                    started.append(1)
                    if stop.is_set():
                        return
            except RequestFailed:
                pass

        threads = [threading.Thread(target=long_stream) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: c.status()["queue"]["in_flight"] == 2, 60, "two requests in flight")
            with pytest.raises(DaemonBusy, match="busy") as e:
                c.generate("x", max_tokens=1)
            assert e.value.retry_after >= 1
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                           timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
            # both get their first token (the scheduler prefills one prompt even when the decode
            # batch is full), then none counts as waiting; both stay in flight
            wait_for(lambda: c.status()["queue"]["waiting"] == 0, 60, "both first tokens")
            st = c.status()
            assert st["queue"]["rejected"] == 2 and st["queue"]["limit"] == 2
            assert st["scheduler"]["queued"] == 0 and st["queue"]["in_flight"] == 2
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            for line in ("dsd_queue_depth 0", "dsd_daemon_queue_in_flight 2", "dsd_daemon_queue_rejected 2",
                         "dsd_daemon_queue_limit 2"):
                assert line in text.splitlines(), (line, text)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        wait_for(lambda: c.status()["queue"]["in_flight"] == 0, 60, "the streams to end")
        # a non-streaming request whose client went away does not hold its slot to max_tokens
        import zmq

        from dsd.daemon import protocol as P

        d = zmq.Context.instance().socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 1000)
        d.connect(P.ctl_endpoint(run.sock_dir))
        d.send(P.pack(P.build(P.TO_DAEMON, "generate", id="gone", prompt="Tell me a long story",
                              stream=False, params={"max_tokens": 3000, "ignore_eos": True})))
        wait_for(lambda: c.status()["scheduler"]["active"] == 1, 60, "the silent request to start")
        d.close()
        wait_for(lambda: c.status()["scheduler"]["active"] == 0, 30, "the silent request to be cancelled")
        assert "its client went away; cancelled" in run.log()
        assert c.status()["queue"]["in_flight"] == 0
        with pytest.raises(RequestTimeout, match="timeout of 0.5 s"):
            c.generate("Tell me a long story", max_tokens=3000, ignore_eos=True, timeout=0.5)
        st = c.status()
        assert st["queue"]["timed_out"] == 1 and st["queue"]["first_token_wait_s_max"] is not None
        assert c.generate("Hello", max_tokens=2, temperature=0).completion_tokens == 2
        # a non-streaming client that stays hears the pings and ignores them
        t0 = time.monotonic()
        r = c.generate("Tell me a long story", max_tokens=300, ignore_eos=True)
        assert r.completion_tokens == 300 and time.monotonic() - t0 > 2.0   # (so it was pinged)
