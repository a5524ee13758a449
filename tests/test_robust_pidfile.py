"""Issue 17 point 2: `dsd stop` / `dsd start` never act on a pid that is not this daemon's, and
the next start or stop removes what a crashed coordinator left (sockets, FIFOs, pid files, shm).

The "reused pid" is a real unrelated process (`sleep`) whose pid is written into daemon.pid
and daemon.json, in the old plain format and in the new one with its true start time and
command line (only the daemon's lock makes a pid file authoritative)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from dsd.client import Client, DaemonNotRunning
from dsd.daemon.instance_dir import Identity
from tests.test_daemon_util import DaemonRun, alive, dsd, running_daemon, shm_segments, wait_for


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)


def _plant_stale_files(sock_dir: str, instance: str, victim: int, worker_victim: int) -> list[str]:
    """What a SIGKILLed coordinator leaves, with its pid now reused by `victim`."""
    os.makedirs(sock_dir, mode=0o700, exist_ok=True)
    for name in ("ctl.sock", "workers.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(sock_dir, name))
        s.close()
    chan = f"dsd-{os.getuid()}-{instance}-w0"
    for suffix in (".c2w", ".w2c"):
        os.mkfifo(os.path.join(sock_dir, chan + suffix), 0o600)
    with open(os.path.join("/dev/shm", chan), "wb") as f:
        f.write(b"\0" * 4096)
    v = Identity.of(victim)
    with open(os.path.join(sock_dir, "daemon.pid"), "w") as f:
        json.dump({"pid": victim, "start": v.start, "cmdline": v.cmdline}, f)
    with open(os.path.join(sock_dir, "daemon.json"), "w") as f:
        wv = Identity.of(worker_victim)
        json.dump({"pid": victim, "workers": [worker_victim],
                   "worker_ids": {str(worker_victim): [wv.start, wv.cmdline]}}, f)
    return [chan]


def test_stop_leaves_an_unrelated_process_alone_and_cleans_stale_files(tmp_path):
    instance = "t" + uuid.uuid4().hex[:8]
    run = DaemonRun(tmp_path, instance)
    neighbour = f"dsd-{os.getuid()}-{instance}-x-w0"     # another instance whose name extends ours
    victims = [_sleeper(), _sleeper()]
    try:
        with open(os.path.join("/dev/shm", neighbour), "wb") as f:
            f.write(b"\0" * 64)
        _plant_stale_files(run.sock_dir, instance, victims[0].pid, victims[1].pid)
        with pytest.raises(DaemonNotRunning, match="did not stop cleanly"):   # at once, no timeout
            Client(socket_dir=run.sock_dir, timeout=60).status()
        p = dsd(["stop", "--timeout", "2"], run.env)
        assert "no daemon was running" in p.stderr, p.stderr
        assert "removed files of a daemon that did not stop cleanly" in p.stderr
        assert all(v.poll() is None for v in victims), "dsd stop signalled an unrelated process"
        assert sorted(os.listdir(run.sock_dir)) == [], os.listdir(run.sock_dir)
        assert shm_segments(instance) == [neighbour]      # the other instance's segment stays
        # the old pid-file format (just a pid) is no authority either
        with open(os.path.join(run.sock_dir, "daemon.pid"), "w") as f:
            f.write(str(victims[0].pid))
        assert "no daemon was running" in dsd(["stop"], run.env).stderr
        assert victims[0].poll() is None
        assert not os.path.exists(os.path.join(run.sock_dir, "daemon.pid"))
        # an old dsd's daemon (plain pid file, `dsd.cli start` in its command line) is reported, not touched
        legacy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "dsd.cli", "start"])
        victims.append(legacy)
        with open(os.path.join(run.sock_dir, "daemon.pid"), "w") as f:
            f.write(str(legacy.pid))
        for args in (["stop"], ["start"]):
            p = dsd(args, run.env, check=False)
            assert p.returncode == 1 and f"pid {legacy.pid} looks like a daemon of an older dsd" in p.stderr
        assert legacy.poll() is None and os.path.exists(os.path.join(run.sock_dir, "daemon.pid"))
    finally:
        for v in victims:
            v.kill()
            v.wait()
        if os.path.exists(os.path.join("/dev/shm", neighbour)):
            os.unlink(os.path.join("/dev/shm", neighbour))
        run.cleanup()


def test_start_after_a_crash_with_the_pid_reused(tmp_path):
    victim = _sleeper()
    try:
        with running_daemon(tmp_path) as run:
            c = run.client(timeout=60)
            want = c.generate("Hello", temperature=0, max_tokens=4).text
            st = c.status()
            coord, worker = st["pid"], st["workers"][0]["pid"]
            # a second coordinator for the same instance is refused and removes nothing of ours
            p = dsd(["start", "--foreground", "--timeout", "30"], run.env, check=False, timeout=120)
            assert p.returncode != 0 and f"(pid {coord}) is already running" in p.stderr
            code = ("import sys; from dsd.daemon.config import load_config; "
                    "from dsd.daemon.coordinator import run_daemon; sys.exit(run_daemon(load_config()))")
            p = subprocess.run([sys.executable, "-c", code], env=run.env, capture_output=True,
                               text=True, timeout=120)        # the coordinator's own check (lock)
            assert p.returncode == 1 and "already running" in p.stderr, p.stderr
            assert c.status()["state"] == "ready"
            os.kill(coord, signal.SIGKILL)                   # crash; the worker follows (PDEATHSIG)
            wait_for(lambda: not alive(coord) and not alive(worker), 20, "the crashed daemon to go")
            assert os.path.exists(os.path.join(run.sock_dir, "ctl.sock")) and shm_segments(run.instance)
            v = Identity.of(victim.pid)            # the crashed coordinator's pid, now reused
            with open(os.path.join(run.sock_dir, "daemon.pid"), "w") as f:
                json.dump({"pid": victim.pid, "start": v.start, "cmdline": v.cmdline}, f)
            p = dsd(["start"], run.env, check=False, timeout=400)
            assert p.returncode == 0, p.stderr + run.log()
            assert "removed files of a previous daemon" in run.log()
            run.remember_pids()
            assert c.generate("Hello", temperature=0, max_tokens=4).text == want
            assert "daemon stopped" in dsd(["stop"], run.env).stderr
            assert victim.poll() is None
            assert shm_segments(run.instance) == []
            assert not os.path.exists(run.sock_dir) or os.listdir(run.sock_dir) == []
    finally:
        assert victim.poll() is None, "an unrelated process was signalled"
        victim.kill()
        victim.wait()
