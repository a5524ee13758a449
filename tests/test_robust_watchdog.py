"""Issue 17 point 4: stalls are detected.  A worker stopped with SIGSTOP no longer freezes every
stream while /health says ok: it is reported as stalled (status, /health 503), recovers if it
is continued, and is killed and restarted if it is not, failing its requests with a message
that says so."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import httpx

from dsd.client import RequestFailed
from dsd.daemon.watchdog import StallWatch
from tests.test_daemon_util import alive, running_daemon, wait_for


class _Chan:
    def __init__(self):
        self.busy = False

    def idle(self):
        return not self.busy


class _H:
    def __init__(self, index, pid, pidfd):
        self.index, self.pid, self.pidfd = index, pid, pidfd
        self.state, self.error, self.channel = "ready", "", _Chan()


class _D:
    def __init__(self, handles):
        self.handles, self.state, self.lines = handles, "ready", []
        self.driver = type("Drv", (), {"_expect": {(0, 0, 1): 0.01}})()

    def log(self, m):
        self.lines.append(m)


def test_watch_marks_recovers_and_kills_the_stopped_one():
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        hs = [_H(i, p.pid, os.pidfd_open(p.pid)) for i, p in enumerate(procs)]
        d = _D(hs)
        t = [0.0]
        w = StallWatch(d, timeout_s=2, kill_s=3, clock=lambda: t[0])
        hs[0].channel.busy = hs[1].channel.busy = True   # worker 1 waits on worker 0's share
        w.check()
        t[0] = 2.5
        w.check()
        assert [h.state for h in hs] == ["stalled", "stalled"] and d.state == "stalled"
        assert "no reply for 2 s" in hs[0].error
        hs[1].channel.busy = False
        w.check()
        assert hs[1].state == "ready" and d.state == "stalled"
        os.kill(procs[0].pid, signal.SIGSTOP)
        hs[1].channel.busy = True
        t[0] = 4.0
        w.check()
        t[0] = 6.0                    # worker 0: 6 s >= 2 + 3; worker 1 busy only 2 s
        w.check()
        assert procs[0].wait(10) == -signal.SIGKILL
        assert procs[1].poll() is None and w.kills == 1
        assert "stalled" in w.explain(f"worker 0 (pid {procs[0].pid}) died while serving this request")
        assert w.explain("worker 1 (pid 1) died") == "worker 1 (pid 1) died"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_sigstopped_worker_is_reported_then_restarted(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_STALL_TIMEOUT_S", "2")
    monkeypatch.setenv("DSD_STALL_KILL_S", "6")
    port = _free_port()
    with running_daemon(tmp_path, "--http", f"127.0.0.1:{port}") as run:
        c = run.client(timeout=30)
        health = f"http://127.0.0.1:{port}/health"
        assert httpx.get(health, timeout=10).status_code == 200
        victim = c.status()["workers"][0]["pid"]
        box = {"tokens": 0}

        def stream():
            try:
                for _ in c.generate("The history of Rome", stream=True, max_tokens=3000, ignore_eos=True):
                    box["tokens"] += 1
                box["finished"] = True
            except RequestFailed as e:
                box["error"] = str(e)

        t = threading.Thread(target=stream)
        t.start()
        try:
            wait_for(lambda: box["tokens"] > 2, 60, "the stream to start")
            os.kill(victim, signal.SIGSTOP)
            wait_for(lambda: c.status()["state"] == "stalled", 30, "the stall to be reported")
            st = c.status()
            assert st["workers"][0]["state"] == "stalled" and "stalled" in st["workers"][0]["error"]
            h = httpx.get(health, timeout=10)
            assert h.status_code == 503 and h.json()["status"] == "stalled"
            os.kill(victim, signal.SIGCONT)                      # it recovers
            wait_for(lambda: c.status()["state"] == "ready", 30, "the recovery")
            n = box["tokens"]
            wait_for(lambda: box["tokens"] > n + 2, 30, "the stream to go on")
            os.kill(victim, signal.SIGSTOP)                      # and now it does not
            t.join(60)
            assert "error" in box, box
            assert f"worker 0 (pid {victim}) stalled" in box["error"] and "retry the request" in box["error"]
            wait_for(lambda: not alive(victim), 10, "the stalled worker to be killed")
            wait_for(lambda: c.status()["state"] == "ready", 180, "the restart")
            st = c.status()
            assert st["workers"][0]["pid"] != victim and st["watchdog"]["stall_kills"] == 1
            assert c.generate("Hello", max_tokens=2).completion_tokens == 2
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
            t.join(60)
