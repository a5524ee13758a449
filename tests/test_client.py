"""dsd.client without a daemon: cheap import, clear errors, message handling."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from dsd.errors import DsdError


def test_import_does_not_pull_numpy_or_numba():
    code = ("import sys, dsd.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('numpy', 'numba', 'tokenizers')"
            " or m.startswith(('dsd.shard', 'dsd.numa'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_errors_are_dsd_errors():
    from dsd.client import DaemonNotRunning, InvalidRequest, RequestFailed

    for cls in (DaemonNotRunning, InvalidRequest, RequestFailed):
        assert issubclass(cls, DsdError)


def test_daemon_not_running(tmp_path):
    from dsd.client import AsyncClient, Client, DaemonNotRunning

    c = Client(socket_dir=str(tmp_path / "none"))
    with pytest.raises(DaemonNotRunning, match="dsd start"):
        c.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(DaemonNotRunning):
        list(c.generate("hi", stream=True))
    with pytest.raises(DaemonNotRunning):
        c.status()
    assert c.ping() is False
    ac = AsyncClient(socket_dir=str(tmp_path / "none"))
    with pytest.raises(DaemonNotRunning):
        asyncio.run(ac.generate("hi"))
    with pytest.raises(DaemonNotRunning):
        asyncio.run(ac.status())


def test_stale_pid_file_is_not_a_daemon(tmp_path):
    from dsd.client import Client, DaemonNotRunning

    d = tmp_path / "sock"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (d / "daemon.pid").write_text(str(p.pid))
    (d / "ctl.sock").write_text("")
    with pytest.raises(DaemonNotRunning):
        Client(socket_dir=str(d)).status()


def test_fake_daemon_round_trip(tmp_path):
    """A stand-in ROUTER speaking the protocol: chunks, errors, result assembly, version check."""
    import threading

    import zmq

    from dsd.client import Client, InvalidRequest, RequestFailed
    from dsd.daemon import protocol as P

    d = tmp_path / "sock"
    d.mkdir()
    (d / "daemon.pid").write_text(str(os.getpid()))
    ctx = zmq.Context.instance()
    srv = ctx.socket(zmq.ROUTER)
    srv.bind(P.ctl_endpoint(str(d)))
    seen = []

    def serve():
        for _ in range(5):
            ident, data = srv.recv_multipart()
            m = P.unpack(data)
            seen.append(m)
            if m["type"] == "status":
                srv.send_multipart([ident, P.pack({"type": "status", "state": "ready"})])
            elif m["type"] == "model_info":   # chat() asks once how the model writes reasoning
                srv.send_multipart([ident, P.pack({"type": "model_info", "chat_format": {"name": "plain"}})])
            elif m["params"].get("max_tokens") == 1:
                srv.send_multipart([ident, P.pack({"type": "error", "id": m["id"], "kind": "invalid",
                                                   "message": "bad"})])
            elif m["params"].get("max_tokens") == 2:
                srv.send_multipart([ident, P.pack({"type": "error", "id": m["id"], "kind": "failed",
                                                   "message": "worker 1 died"})])
            else:
                for i, fin in enumerate([None, None, "stop"]):
                    srv.send_multipart([ident, P.pack({"type": "chunk", "id": m["id"], "text": f"t{i}",
                                                       "finish_reason": fin, "token_ids": [i],
                                                       "prompt_tokens": 3, "completion_tokens": i + 1})])

    th = threading.Thread(target=serve)
    th.start()
    try:
        c = Client(socket_dir=str(d))
        assert c.status()["state"] == "ready"
        chunks = list(c.chat([{"role": "user", "content": "x"}], stream=True, max_tokens=5))
        assert [ch.text for ch in chunks] == ["t0", "t1", "t2"]
        assert chunks[0].completion_tokens is None and chunks[-1].completion_tokens == 3
        assert chunks[-1].finish_reason == "stop" and chunks[-1].prompt_tokens == 3
        with pytest.raises(InvalidRequest, match="bad"):
            c.generate("x", max_tokens=1)
        with pytest.raises(RequestFailed, match="worker 1 died"):
            c.generate([1, 2], max_tokens=2)
    finally:
        th.join(10)
        srv.close(0)
    assert all(m["v"] == P.VERSION for m in seen)
    assert seen[2]["messages"] == [{"role": "user", "content": "x"}] and seen[2]["stream"] is True
    assert seen[4]["prompt_ids"] == [1, 2]
