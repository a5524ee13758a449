"""Helpers for daemon tests: start a daemon on a private socket dir, always clean up after it.

`running_daemon(...)` runs `dsd start` (a real background daemon) with DSD_SOCKET_DIR set to a
fresh directory and a unique instance name, and on exit runs `dsd stop`, then kills any process
it left and unlinks any /dev/shm segment of that instance, so a failing test leaves nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def daemon_env(sock_dir: str, instance: str, log_file: str) -> dict:
    env = dict(os.environ)
    env.update(DSD_SOCKET_DIR=sock_dir, DSD_INSTANCE=instance, DSD_LOG_FILE=log_file)
    return env


def dsd(args: list[str], env: dict, timeout: float = 300, check: bool = True, input: str | None = None):
    p = subprocess.run([sys.executable, "-m", "dsd.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=REPO, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"dsd {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def shm_segments(instance: str) -> list[str]:
    pre = f"dsd-{os.getuid()}-{instance}-"
    return [f for f in os.listdir("/dev/shm") if f.startswith(pre)]


def pids_of(sock_dir: str) -> list[int]:
    try:
        with open(os.path.join(sock_dir, "daemon.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return []
    return [p for p in [info.get("pid")] + info.get("workers", []) if p]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
    return True


class DaemonRun:
    def __init__(self, tmp_path, instance: str):
        self.instance = instance
        self.sock_dir = str(tmp_path / "sock" / instance)
        self.log_file = str(tmp_path / f"{instance}.log")
        self.env = daemon_env(self.sock_dir, instance, self.log_file)
        self.pids: list[int] = []

    def client(self, cls=None, **kw):
        from dsd.client import Client

        return (cls or Client)(socket_dir=self.sock_dir, **kw)

    def log(self) -> str:
        try:
            with open(self.log_file) as f:
                return f.read()
        except OSError:
            return ""

    def remember_pids(self) -> list[int]:
        for p in pids_of(self.sock_dir):
            if p not in self.pids:
                self.pids.append(p)
        return self.pids

    def cleanup(self) -> None:
        self.remember_pids()
        dsd(["stop", "--timeout", "20"], self.env, check=False, timeout=60)
        for p in self.pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        for name in shm_segments(self.instance):
            os.unlink(os.path.join("/dev/shm", name))


@contextlib.contextmanager
def running_daemon(tmp_path, *start_args: str, start: bool = True):
    run = DaemonRun(tmp_path, "t" + uuid.uuid4().hex[:8])
    try:
        if start:
            p = dsd(["start", *start_args], run.env, check=False, timeout=400)
            if p.returncode != 0:
                raise AssertionError(f"dsd start failed:\n{p.stderr}\n--- log ---\n{run.log()}")
            run.start_output = p.stderr
            run.remember_pids()
        yield run
    finally:
        run.cleanup()


def wait_for(pred, timeout: float, what: str):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_shm_segments_helper_sees_only_its_instance():
    assert shm_segments("no-such-instance-" + uuid.uuid4().hex) == []
