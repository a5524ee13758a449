"""Issue 17 point 3: workers are restarted by rate (restart_max per restart_window_s, forgiven
after restart_healthy_s of healthy running), not by a lifetime count, and status and /metrics
say what happened."""
from __future__ import annotations

import os
import signal
import time

from dsd.daemon.http_metrics import Metrics
from dsd.daemon.restarts import RestartPolicy
from tests.test_daemon_util import alive, running_daemon, wait_for


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_deaths_days_apart_never_stop_the_daemon():
    c = Clock()
    p = RestartPolicy(3, 600, 300, clock=c)
    for day in range(10):          # the old rule stopped the daemon at the 4th death
        c.t = day * 86400.0
        assert p.allow() == (True, "")
        c.t += 60
        p.ready()
    assert p.total == 10 and p.recent() == 1      # only the last one, a minute ago


def test_a_crash_loop_is_stopped_and_healthy_running_forgives():
    c = Clock()
    p = RestartPolicy(2, 100, 50, clock=c)
    assert p.allow()[0] and p.recent() == 1
    c.t = 1
    assert p.allow()[0] and p.recent() == 2
    c.t = 2
    ok, why = p.allow()
    assert not ok and "died 3 times within 100 s" in why and "restart_max 2" in why
    c.t = 200                       # the window slides
    assert p.recent() == 0 and p.allow()[0]
    p.ready()
    c.t = 230                       # ready 30 s < 50: still counted
    assert p.allow()[0] and p.recent() == 2
    p.ready()
    c.t = 290                       # ready 60 s >= 50: forgiven
    assert p.allow()[0] and p.recent() == 1
    assert p.report() == {"restarts": 5, "recent_restarts": 1, "restart_max": 2, "restart_window_s": 100.0}


def _kill_worker(c) -> int:
    pid = c.status()["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _ready_again(c, old_pid):
    wait_for(lambda: (lambda s: s["state"] == "ready" and s["workers"][0]["pid"] != old_pid)(c.status()),
             180, "the worker's restart")


def test_daemon_restarts_by_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_RESTART_MAX", "1")
    monkeypatch.setenv("DSD_RESTART_WINDOW_S", "3600")
    monkeypatch.setenv("DSD_RESTART_HEALTHY_S", "4")
    with running_daemon(tmp_path) as run:
        c = run.client(timeout=30)
        _ready_again(c, _kill_worker(c))
        w = c.status()["workers"][0]
        assert (w["restarts"], w["recent_restarts"], w["restart_max"]) == (1, 1, 1)
        time.sleep(5)                                   # healthy past restart_healthy_s
        st = c.status()
        assert st["workers"][0]["recent_restarts"] == 0
        text = Metrics().render(st)
        assert 'dsd_daemon_workers_restarts{index="0",node="0"} 1' in text, text
        assert 'dsd_daemon_workers_recent_restarts{index="0",node="0"} 0' in text
        _ready_again(c, _kill_worker(c))               # forgiven: restarted again
        assert c.status()["workers"][0]["restarts"] == 2
        coord = c.status()["pid"]
        _kill_worker(c)                                 # at once: a crash loop, no restart
        wait_for(lambda: not alive(coord), 60, "the daemon to stop")
        log = run.log()
        assert "worker 0 died and will not be restarted: it died 2 times within 3600 s" in log, log[-2000:]


def test_config_refuses_negative_limits():
    import pytest

    from dsd.daemon.config import load_config
    from dsd.errors import DsdError

    for key, val in (("MAX_QUEUE", "-1"), ("RESTART_MAX", "-2"), ("STALL_TIMEOUT_S", "-5")):
        with pytest.raises(DsdError, match=f"{key.lower()} must be >= 0"):
            load_config(env={f"DSD_{key}": val})
