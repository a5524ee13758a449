"""A real Linux kernel with two NUMA nodes under qemu TCG: placement checks + harness checks.

These are slow (~1-2 min in all) and need `.ci/setup-vm.sh` to have run; without
qemu or the kernel they FAIL with the fix in the message (never skip).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.numa_vm import harness
from tests.numa_vm.harness import VMBootError, VMSetupError, VMTimeoutError, run_in_vm

TESTS = Path(__file__).resolve().parent

CHECKS_SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS.parent)!r})
from tests.numa_vm import guest_checks
failed = guest_checks.main("/tmp/dsdvm/out/checks.json")
print("checks failed:", failed)
"""


def _warm_numba_cache() -> None:
    """Compile guest_numba on the host with the guest's settings (README: warming)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(harness.NUMBA_CACHE), NUMBA_CPU_NAME="generic")
    harness.NUMBA_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import tests.numa_vm.guest_numba as g; g.run()"],
                   cwd=TESTS.parent, env=env, check=True, timeout=300)


@pytest.fixture(scope="module")
def checks():
    """Boot once, run every guest check, return {check: observations}."""
    _warm_numba_cache()
    r = run_in_vm(CHECKS_SCRIPT, timeout=480)
    r.check()
    assert "checks.json" in r.files, r.stderr
    res = json.loads(r.files["checks.json"])
    res["_timings"] = r.timings
    print(f"\nVM timings: {r.timings}; per check: "
          f"{ {k: round(v.get('elapsed_s', 0), 2) for k, v in res.items() if k != '_timings'} }")
    return res


def _ok(res: dict, name: str) -> dict:
    assert "error" not in res[name], res[name]["error"]
    return res[name]


@pytest.mark.slow
def test_guest_sees_two_numa_nodes(checks):
    t = _ok(checks, "topology")
    assert t["nodes"] == ["node0", "node1"]
    assert t["online"] == "0-1"
    assert t["node0_cpus"] == ["cpu0"] and t["node1_cpus"] == ["cpu1"]
    assert t["node0_cpulist"] == "0" and t["node1_cpulist"] == "1"
    # 1 GiB per node, less what the kernel reserves
    assert 700_000 < t["node1_memtotal_kb"] <= 1 << 20
    assert t["numa_balancing"] == "0"


@pytest.mark.slow
def test_mbind_places_pages_on_node1(checks):
    m = _ok(checks, "mbind_node1")
    assert "bind:1" in m["line"], m["line"]
    assert m["counts"] == {"N1": m["pages"]}, m["line"]


@pytest.mark.slow
def test_first_touch_on_cpu1_lands_on_node1(checks):
    m = _ok(checks, "first_touch_cpu1")
    assert m["counts"].get("N1", 0) == m["pages"], m["line"]
    assert "N0" not in m["counts"], m["line"]


@pytest.mark.slow
def test_hugetlb_2m_pages_on_node1(checks):
    h = _ok(checks, "hugetlb_node1")
    assert h["pool_node0"] == 0 and h["pool_node1"] == 4
    assert " huge " in f" {h['line']} ", h["line"]
    assert "kernelpagesize_kB=2048" in h["line"], h["line"]
    assert h["counts"] == {"N1": h["hugepages"]}, h["line"]
    assert h["free_node1_after"] == 4 - h["hugepages"]


@pytest.mark.slow
def test_host_python_and_dsd_import_in_guest(checks):
    i = _ok(checks, "imports")
    import dsd.shard
    assert i["dsd_shard_file"] == dsd.shard.__file__     # same checkout, same path
    assert i["sum"] == 45.0


@pytest.mark.slow
def test_numba_cache_warmed_on_host_hits_in_guest(checks):
    n = _ok(checks, "numba_cache")
    assert n["value"] == sum(x + 1.0 for x in range(8))
    assert n["cache_dir"] == str(harness.NUMBA_CACHE)
    assert n["cache_hits"] >= 1 and n["cache_misses"] == 0, n


@pytest.mark.slow
def test_exit_code_output_env_and_files():
    script = (
        'echo "out:$DSDVM_T"\n'
        'echo "err-line" >&2\n'
        'cp /tmp/dsdvm/in/data.txt /tmp/dsdvm/out/copy.txt\n'
        'pwd > /tmp/dsdvm/out/pwd.txt\n'
        'exit 7\n')
    r = run_in_vm(script, timeout=300, env={"DSDVM_T": "a b'c"}, lang="sh", cwd="/proc",
                  files={"in/data.txt": "hello\n"})
    assert r.returncode == 7, r.console[-2000:]
    assert r.stdout == "out:a b'c\n"
    assert r.stderr == "err-line\n"
    assert r.files == {"copy.txt": b"hello\n", "pwd.txt": b"/proc\n"}
    assert r.timings["init"] < r.timings["start"] <= r.timings["end"]


@pytest.mark.slow
def test_timeout_kills_qemu_and_removes_tempdir(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def spy(argv, *a, **kw):
        p = real_popen(argv, *a, **kw)
        started.append((p, argv))
        return p

    monkeypatch.setattr(harness.subprocess, "Popen", spy)
    with pytest.raises(VMTimeoutError, match="did not finish"):
        run_in_vm("import time\nprint('sleeping', flush=True)\ntime.sleep(1000)\n",
                  timeout=25)
    assert len(started) == 1
    proc, argv = started[0]
    assert proc.returncode is not None               # reaped: qemu is gone
    assert not Path(f"/proc/{proc.pid}/cmdline").exists() or \
        b"qemu" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    run_dir = next(a.split("path=")[1].split(",")[0] for a in argv if "id=run," in a)
    assert not Path(run_dir).parent.exists()         # temp dir removed


@pytest.mark.slow
def test_guest_init_failure_is_reported_not_hung():
    # A mount the init cannot make: it must power off and say why, not hang to the timeout.
    with pytest.raises(VMBootError, match="mount pyroot"):
        run_in_vm("print(1)", timeout=300, cmdline_extra="dsdvm_pyroot=/nonexistent-dir")


def test_missing_qemu_fails_with_setup_hint(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VMSetupError, match="setup-vm.sh"):
        run_in_vm("print(1)", timeout=5)
