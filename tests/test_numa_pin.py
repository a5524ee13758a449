"""Pinning a process and numba's threads to a node (run in child processes: pinning is global)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dsd.errors import NumaError
from dsd.numa import pin_to_node, read_topology

ENV = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}


def run_child(code: str, timeout=240) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pin_before_numba_pins_every_pool_thread():
    cpu = max(read_topology().node(0).cpus)
    out = run_child(f"""
        import json, os
        from dsd.numa import pin_to_node, current_binding
        res = pin_to_node(0, cpus=[{cpu}], policy="bind")
        import numba, numpy as np
        @numba.njit(parallel=True)
        def f(a):
            s = 0.0
            for i in numba.prange(a.shape[0]):
                s += a[i]
            return s
        total = f(np.ones(100000))
        tasks = {{}}
        for tid in os.listdir("/proc/self/task"):
            st = open(f"/proc/self/task/{{tid}}/status").read()
            tasks[tid] = [l.split(":")[1].strip() for l in st.splitlines()
                          if l.startswith("Cpus_allowed_list")][0]
        print(json.dumps({{"res": [res.node, list(res.cpus), res.policy, res.numba_pool_started],
                           "env": os.environ.get("NUMBA_NUM_THREADS"),
                           "threads": numba.get_num_threads(), "total": total,
                           "binding": current_binding(), "tasks": tasks}}))
    """)
    assert out["res"] == [0, [cpu], "bind", False]
    assert out["env"] == "1" and out["threads"] == 1 and out["total"] == 100000.0
    assert out["binding"] == {"cpus": [cpu], "policy": "bind", "nodes": [0]}
    assert len(out["tasks"]) >= 2  # main thread + numba's pool
    assert set(out["tasks"].values()) == {str(cpu)}


def test_pin_after_numba_pool_started_repins_and_says_so():
    topo = read_topology()
    cpus = topo.node(0).cpus
    out = run_child(f"""
        import json, os, numba, numpy as np
        @numba.njit(parallel=True)
        def f(a):
            return a.sum()
        f(np.ones(1000))  # starts the pool on all CPUs
        from dsd.numa import pin_to_node, current_binding
        res = pin_to_node(0, cpus=[{cpus[0]}])
        allowed = set()
        for tid in os.listdir("/proc/self/task"):
            allowed.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
        print(json.dumps({{"started": res.numba_pool_started, "notice": res.notice,
                           "threads": numba.get_num_threads(), "allowed": sorted(allowed),
                           "binding": current_binding()}}))
    """)
    assert out["started"] is True and "already running" in out["notice"]
    assert out["threads"] == 1
    assert out["allowed"] == [[cpus[0]]]
    assert out["binding"]["policy"] == "preferred" and out["binding"]["nodes"] == [0]


def test_pin_to_virtual_node_uses_its_cpu_subset():
    out = run_child("""
        import json
        from dsd.numa import pin_to_node, read_topology, virtual_nodes, current_binding
        v, msg = virtual_nodes(2, read_topology())
        res = pin_to_node(v[1])
        print(json.dumps({"cpus": list(res.cpus), "want": list(v[1].cpus),
                          "binding": current_binding()}))
    """)
    assert out["cpus"] == out["want"] and out["binding"]["cpus"] == out["want"]


@pytest.mark.parametrize("kw", [{"target": 9}, {"target": -1}, {"target": "0"},
                                {"target": 0, "cpus": [999]}, {"target": 0, "cpus": []},
                                {"target": 0, "policy": "interleave-all"}])
def test_bad_pin_requests_raise_before_changing_anything(kw):
    before = os.sched_getaffinity(0)
    with pytest.raises(NumaError):
        pin_to_node(**kw)
    assert os.sched_getaffinity(0) == before
