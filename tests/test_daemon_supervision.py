"""Supervision: a SIGKILLed worker fails its in-flight requests fast and is restarted; stop and
SIGTERM leave no processes, sockets, /dev/shm segments or hugepages behind."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dsd.client import DaemonNotRunning, RequestFailed
from tests.test_daemon_util import alive, dsd, running_daemon, shm_segments, wait_for
from tests.test_numa_alloc import pools  # noqa: F401  (fixture: reserves pages, restores the pool)


def hugepages_free() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(("HugePages_Free", "HugePages_Total")):
                k, v = line.split(":")
                out[k] = int(v)
    return out


def assert_clean(run, pids):
    for p in pids:
        wait_for(lambda: not alive(p), 10, f"pid {p} to exit")
    assert shm_segments(run.instance) == []
    left = os.listdir(run.sock_dir) if os.path.isdir(run.sock_dir) else []
    assert left == [], left


@pytest.mark.parametrize("model", ["smollm2", "moe_rows"])
def test_killed_worker_fails_inflight_and_restarts(tmp_path, model):
    """SmolLM2: a layer pipeline. moe_rows: a tiny DeepSeek2 split by rows, where each layer's
    owner asks the other worker for its expert share directly (the victim may die while its
    peer waits on it)."""
    args = ["--nodes", "2"]
    if model == "moe_rows":
        from tests.tiny_moe import write_tiny_deepseek2

        path = write_tiny_deepseek2(str(tmp_path / "ds.gguf"), n_layers=4, E=16, k=4, F=64, ctx=4096)
        args += ["--model", path, "--placement", "rows"]
    with running_daemon(tmp_path, *args) as run:
        c = run.client()
        want = c.generate("Once upon a time", temperature=0, max_tokens=16).text
        st = c.status()
        victim = st["workers"][0]["pid"]
        got_first = threading.Event()
        result = {}

        def stream():
            try:
                for ch in c.generate("The history of Rome", stream=True, temperature=0,
                                     max_tokens=3000, ignore_eos=True):
                    got_first.set()
                result["finished"] = ch.finish_reason
            except RequestFailed as e:
                result["error"] = str(e)
                result["t"] = time.monotonic()

        t = threading.Thread(target=stream)
        t.start()
        assert got_first.wait(120)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        t.join(30)
        assert "error" in result, result
        assert "worker 0" in result["error"] and "died" in result["error"]
        assert f"pid {victim})" in result["error"], result["error"]  # the pid that died, not its successor
        assert result["t"] - t_kill < 2.0, result["t"] - t_kill
        # restarted with a new pid; later requests succeed with the same answer
        wait_for(lambda: c.status()["state"] == "ready" and c.status()["workers"][0]["pid"] != victim,
                 120, "worker 0 restart")
        st2 = c.status()
        assert st2["workers"][0]["restarts"] == 1 and alive(st2["workers"][0]["pid"])
        assert not alive(victim)
        assert c.generate("Once upon a time", temperature=0, max_tokens=16).text == want
        pids = run.remember_pids() + [w["pid"] for w in st2["workers"]]
        dsd(["stop"], run.env)
        assert_clean(run, pids)


@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_stop_and_sigterm_leave_nothing(tmp_path, how):
    before = hugepages_free()
    with running_daemon(tmp_path, "--nodes", "2") as run:
        st = run.client().status()
        pids = [st["pid"]] + [w["pid"] for w in st["workers"]]
        assert all(alive(p) for p in pids)
        on_shm = [w for w in st["workers"] if w["channel_pages"] == "shm"]  # else 2 MiB memfds
        # per worker its command channel and its links to the n - 1 others, in the same pages
        assert len(shm_segments(run.instance)) == len(on_shm) * len(st["workers"])
        assert oct(os.stat(run.sock_dir).st_mode & 0o777) == "0o700"
        if how == "stop":
            dsd(["stop"], run.env)
        else:
            os.kill(st["pid"], signal.SIGTERM)
        assert_clean(run, pids)
        with pytest.raises(DaemonNotRunning):
            run.client().status()
    assert hugepages_free() == before


def test_sigkilled_coordinator_takes_workers_and_stop_cleans(tmp_path):
    with running_daemon(tmp_path, "--nodes", "2") as run:
        st = run.client().status()
        workers = [w["pid"] for w in st["workers"]]
        os.kill(st["pid"], signal.SIGKILL)
        for p in workers:  # PR_SET_PDEATHSIG
            wait_for(lambda: not alive(p), 10, f"worker {p} to die with the coordinator")
        with pytest.raises(DaemonNotRunning):
            run.client().status()
        dsd(["stop"], run.env)
        assert shm_segments(run.instance) == []
        # and a new daemon starts over the leftovers
        p = dsd(["start", "--nodes", "1"], run.env, check=False, timeout=300)
        assert p.returncode == 0, p.stderr + run.log()
        run.remember_pids()
        assert run.client().generate("Hi", temperature=0, max_tokens=3).completion_tokens == 3


def test_start_twice_and_start_failure_reasons(tmp_path):
    with running_daemon(tmp_path, "--nodes", "1") as run:
        p = dsd(["start"], run.env, check=False)
        assert p.returncode == 1 and "already running" in p.stderr
    with running_daemon(tmp_path, start=False) as run:
        p = dsd(["start", "--model", str(tmp_path / "missing.gguf")], run.env, check=False)
        assert p.returncode == 1 and "missing.gguf" in p.stderr and "does not exist" in p.stderr
        p = dsd(["start", "--pages", "1g", "--timeout", "120"], run.env, check=False)
        if hugepages_free().get("HugePages_Total", 0) == 0:  # no 1 GiB pool here: a clear reason
            assert p.returncode == 1 and "1g" in p.stderr and "nr_hugepages" in p.stderr, p.stderr
        assert shm_segments(run.instance) == []


def test_channels_in_hugepages_when_the_pool_spares_them(tmp_path, pools, monkeypatch):
    """channel_hugepages on, 2 MiB pages to spare beyond the weights: the activation channels are memfds in
    2 MiB hugepages (workers map them; a layer owner maps the other worker's too), nothing is
    left in /dev/shm, and stop gives every page back."""
    from tests.tiny_moe import write_tiny_deepseek2

    path = write_tiny_deepseek2(str(tmp_path / "ds.gguf"), n_layers=4, E=16, k=4, F=64)
    pools("2m", 24)
    before = hugepages_free()
    monkeypatch.setenv("DSD_CHANNEL_HUGEPAGES", "1")  # the daemon's environment copies ours
    with running_daemon(tmp_path, "--model", path, "--nodes", "2", "--placement", "rows",
                        "--pages", "2m") as run:
        c = run.client()
        st = c.status()
        assert [w["channel_pages"] for w in st["workers"]] == ["2m", "2m"]
        assert shm_segments(run.instance) == []
        assert len(c.generate([1, 2, 3, 4], temperature=0, max_tokens=6).token_ids) == 6
        for w in st["workers"]:
            with open(f"/proc/{w['pid']}/smaps") as f:
                smaps = f.read().split("\n")
            sizes = [smaps[i + j] for i, line in enumerate(smaps) if "/memfd:dsd-" in line
                     for j in range(1, 25) if i + j < len(smaps) and smaps[i + j].startswith("KernelPageSize")]
            assert sizes and all("2048 kB" in x for x in sizes), sizes
        assert hugepages_free()["HugePages_Free"] < before["HugePages_Free"]
        pids = [st["pid"]] + [w["pid"] for w in st["workers"]]
        dsd(["stop"], run.env)
        assert_clean(run, pids)
    assert hugepages_free() == before
