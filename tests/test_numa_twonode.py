"""dsd.numa on a real two-node kernel (qemu guest from tests/numa_vm; ~1 min, needs
`bash .ci/setup-vm.sh`). One boot runs every check and returns JSON; each test asserts one part.

Guest: node 0 = CPU 0 + 1 GiB, node 1 = CPU 1 + 1 GiB; 2 MiB pages reserved on node 1 only.
"""
from __future__ import annotations

import json

import pytest

from tests.numa_vm import run_in_vm

GUEST = r'''
import dataclasses, json, os, sys, traceback
sys.path.insert(0, os.getcwd())
out = {}
def check(name):
    def deco(f):
        try:
            out[name] = f()
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    return deco

from dsd.numa import (allocate, pin_to_node, current_binding, read_topology, virtual_nodes,
                      process_placement, live_bytes)
from dsd.errors import HugePagePoolError
MIB = 1 << 20
with open("/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages", "w") as f:
    f.write("8")
topo = read_topology()

@check("topology")
def _():
    v, msg = virtual_nodes(2, topo)
    return {"ids": topo.node_ids, "cpus": [list(n.cpus) for n in topo.nodes],
            "dist": [list(n.distances) for n in topo.nodes],
            "free2m": [n.pool("2m").free for n in topo.nodes],
            "vnodes": [[x.node, list(x.cpus)] for x in v], "msg": msg}

@check("strict_2m_node1")
def _():
    with allocate(10 * MIB, 1, pages="2m") as b:
        pl = b.placement()
        nm = process_placement("self", b.address, b.mapped_bytes)
        b.array()[:] = 1
        return {"all_on_1": pl.all_on(1, "2m"), "by_node": pl.to_dict()["bytes_by_node"],
                "numa_maps_by_node": nm.to_dict()["bytes_by_node"],
                "numa_maps_pages": nm.bytes_by_page}

@check("strict_2m_wrong_node")
def _():
    # the pool is on node 1: a hugetlb mapping bound to node 0 would SIGBUS at first touch
    try:
        allocate(4 * MIB, 0, pages="2m")
        return {"raised": None}
    except HugePagePoolError as e:
        return {"raised": type(e).__name__, "msg": str(e),
                "free_after": read_topology().node(1).pool("2m").free}

@check("auto_stale_pool_on_wrong_node")
def _():
    # pretend node 0 had 4 free 2 MiB pages: auto must find out at populate and fall back
    n0 = dataclasses.replace(topo.node(0), pools={**topo.node(0).pools,
        "2m": dataclasses.replace(topo.node(0).pool("2m"), free=4, total=4)})
    fake = dataclasses.replace(topo, nodes=(n0, topo.node(1)))
    with allocate(12 * MIB, 0, pages="auto", topology=fake) as b:
        pl = b.placement()
        return {"kinds": b.bytes_by_kind(), "frac0": pl.fraction_on(0),
                "not_present": pl.not_present}

@check("auto_node1")
def _():
    with allocate(20 * MIB, 1) as b:
        pl = b.placement()
        return {"kinds": b.bytes_by_kind(), "frac1": pl.fraction_on(1),
                "pages": pl.bytes_by_page}

@check("4k_node1_and_node0")
def _():
    res = {}
    for node in (0, 1):
        with allocate(8 * MIB, node, pages="4k") as b:
            res[node] = b.placement().fraction_on(node)
    return res

@check("pin_node1")
def _():
    r = pin_to_node(1, policy="bind")
    import numpy as np
    a = np.ones(4 * MIB // 8)  # default-policy memory now comes from node 1
    from dsd.numa.proof import placement
    pl = placement(a.ctypes.data - a.ctypes.data % 4096, a.nbytes)
    return {"cpus": list(r.cpus), "binding": current_binding(), "frac1": pl.fraction_on(1)}

out["live_bytes"] = live_bytes()
os.makedirs("/tmp/dsdvm/out", exist_ok=True)
with open("/tmp/dsdvm/out/res.json", "w") as f:
    json.dump(out, f)
'''


@pytest.fixture(scope="module")
def res():
    r = run_in_vm(GUEST, timeout=480)
    r.check()
    assert "res.json" in r.files, r.stdout + r.stderr
    return json.loads(r.files["res.json"])


def _ok(res, name):
    assert "error" not in res[name], res[name]
    return res[name]


@pytest.mark.slow
def test_two_node_topology_and_virtual_nodes(res):
    t = _ok(res, "topology")
    assert t["ids"] == [0, 1] and t["cpus"] == [[0], [1]]
    assert t["dist"][0][0] == 10 and t["dist"][0][1] > 10
    assert t["free2m"] == [0, 8]
    assert t["vnodes"] == [[0, [0]], [1, [1]]] and t["msg"] == ""


@pytest.mark.slow
def test_2m_buffer_on_node1_proven_two_ways(res):
    r = _ok(res, "strict_2m_node1")
    assert r["all_on_1"] is True and r["by_node"] == {"1": 10 << 20}
    assert r["numa_maps_by_node"] == {"1": 10 << 20} and r["numa_maps_pages"] == {"2m": 10 << 20}


@pytest.mark.slow
def test_pool_on_the_other_node_is_a_clean_error_not_sigbus(res):
    r = _ok(res, "strict_2m_wrong_node")
    assert r["raised"] == "HugePagePoolError" and "node 0" in r["msg"]
    assert r["free_after"] == 8  # nothing leaked from node 1's pool


@pytest.mark.slow
def test_auto_falls_back_when_pool_is_not_really_on_the_node(res):
    r = _ok(res, "auto_stale_pool_on_wrong_node")
    assert "2m" not in r["kinds"] and sum(r["kinds"].values()) == 12 << 20
    assert r["frac0"] == 1.0 and r["not_present"] == 0


@pytest.mark.slow
def test_auto_on_node1_uses_its_pool_then_thp(res):
    r = _ok(res, "auto_node1")
    assert r["kinds"]["2m"] == 16 << 20 and sum(r["kinds"].values()) == 20 << 20
    assert r["frac1"] == 1.0 and r["pages"]["2m"] == 16 << 20


@pytest.mark.slow
def test_4k_buffers_land_on_the_asked_node(res):
    assert _ok(res, "4k_node1_and_node0") == {"0": 1.0, "1": 1.0}


@pytest.mark.slow
def test_pinned_process_memory_goes_to_its_node(res):
    r = _ok(res, "pin_node1")
    assert r["cpus"] == [1] and r["binding"] == {"cpus": [1], "policy": "bind", "nodes": [1]}
    assert r["frac1"] == 1.0
    assert res["live_bytes"] == 0
