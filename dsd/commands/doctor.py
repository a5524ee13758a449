"""`dsd doctor`: NUMA topology, THP mode, hugepage pools, and what a model needs per node."""
from __future__ import annotations

import argparse

HELP = "show NUMA topology and hugepage pools; plan (and --apply) hugepages for a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="GGUF model to plan hugepages for")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="number of workers / NUMA nodes (default: nodes with CPUs)")
    p.add_argument("--apply", action="store_true",
                   help="as root, reserve the planned hugepages and report what the kernel gave")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    # fake sysfs tree for tests (plans and --apply then read and write under it)
    p.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)


def _gib(n: int) -> str:
    from dsd.numa.alloc import human

    return human(n)


def bytes_per_worker(model_path: str, n: int, placement: str = "auto") -> list[int]:
    """Exact weight-buffer bytes of each worker under the daemon's placement plan (what
    `dsd start --nodes n` allocates), so reserved pools fit uneven splits too."""
    from dsd.daemon.placement import make_plan
    from dsd.daemon.slice_weights import SliceWeights
    from dsd.shard.gguf_file import open_gguf

    from dsd.shard.gguf_check import check_model

    with open_gguf(model_path) as g:
        check_model(g)  # a damaged or unsupported file is refused before any planning
        plan = make_plan(g, n, placement)
        return [max(SliceWeights(g, pieces, allocate=False).nbytes, 4096) for pieces in plan.pieces]


def build_report(args) -> dict:
    from dsd.errors import NumaError
    from dsd.numa import _sys
    from dsd.numa.plan import apply_plan, hugepage_plan
    from dsd.numa.topology import format_cpulist, read_topology, virtual_nodes

    topo = read_topology(args.sysfs_root)
    rep: dict = {"topology": topo.to_dict(), "thp": topo.thp,
                 "numa_syscalls": _sys.numa_syscalls_work(), "libnuma": _sys.libnuma_version()}
    n = args.nodes if args.nodes is not None else len([x for x in topo.nodes if x.cpus])
    if args.nodes is not None or args.model:
        vnodes, msg = virtual_nodes(n, topo)
        rep["workers"] = [{"worker": v.index, "node": v.node, "cpus": format_cpulist(v.cpus)}
                          for v in vnodes]
        rep["workers_message"] = msg
    if args.model:
        per_worker = bytes_per_worker(args.model, n)
        needs, _ = hugepage_plan(per_worker, topo)
        from dsd.shard.gguf_check import check_memory_fit

        check_memory_fit(per_worker, topo, args.sysfs_root)  # refuses a model that cannot fit
        rep["model"] = {"path": str(args.model), "bytes": sum(per_worker),
                        "bytes_per_worker": per_worker}
        rep["plan"] = [{"node": x.node, "bytes": x.nbytes, "pages_1g": x.pages_1g,
                        "pages_2m": x.pages_2m, "pages_2m_only": x.pages_2m_only,
                        "free_1g": x.have_1g_free, "free_2m": x.have_2m_free,
                        "nr_hugepages_1g": x.target_1g, "nr_hugepages_2m": x.target_2m,
                        "commands": x.commands()} for x in needs]
        rep["commands"] = [c for x in needs for c in x.commands()]
        rep["warnings"] = [
            f"node {x.node} would hold {_gib(x.nbytes)} but has {_gib(topo.node(x.node).mem_free)}"
            f" free: use more nodes or free memory (in VMs the per-node figure may under-read)"
            for x in needs if x.nbytes > topo.node(x.node).mem_free]
        if args.apply:
            rep["applied"] = apply_plan(needs, args.sysfs_root)
    elif args.apply:
        raise NumaError("--apply needs --model PATH (and optionally --nodes N) to know what to reserve")
    return rep


def print_text(rep: dict) -> None:
    t = rep["topology"]
    print(f"NUMA: {len(t['nodes'])} node(s)"
          f"{'' if t['numa_kernel'] else ' (kernel without NUMA: one synthesised node)'}; "
          f"THP: {rep['thp']}; NUMA syscalls: {'ok' if rep['numa_syscalls'] else 'blocked'}; "
          f"libnuma: {rep['libnuma'] or 'not installed'} (not needed: dsd uses raw syscalls)")
    from dsd.numa.topology import format_cpulist

    for nd in t["nodes"]:
        print(f"  node {nd['id']}: CPUs {format_cpulist(nd['cpus']) or '-'}, memory "
              f"{_gib(nd['mem_total'])} total, {_gib(nd['mem_free'])} free, "
              f"distances {nd['distances']}")
        for kind, p in nd["hugepages"].items():
            print(f"    {kind} pages: {p['total']} reserved, {p['free']} free, "
                  f"{p['surplus']} surplus")
    if rep.get("workers_message"):
        print(f"note: {rep['workers_message']}")
    if "model" in rep:
        m = rep["model"]
        print(f"model {m['path']}: {_gib(m['bytes'])} of tensors over "
              f"{len(m['bytes_per_worker'])} worker(s), {_gib(m['bytes_per_worker'][0])} each")
        for p in rep["plan"]:
            print(f"  node {p['node']} holds {_gib(p['bytes'])}: needs {p['pages_1g']} x 1 GiB + "
                  f"{p['pages_2m']} x 2 MiB pages (or {p['pages_2m_only']} x 2 MiB only); "
                  f"free now: {p['free_1g']} x 1 GiB, {p['free_2m']} x 2 MiB")
        for w in rep["warnings"]:
            print(f"warning: {w}")
        if rep["commands"]:
            print("reserve them (as root; 1 GiB pages first, after `echo 1 > "
                  "/proc/sys/vm/compact_memory`), or rerun with --apply:")
            for c in rep["commands"]:
                print(f"  {c}")
        else:
            print("the pools already hold enough free pages")
    for a in rep.get("applied", []):
        print(f"applied on node {a['node']}: 1 GiB pages {a['got_1g']}/{a['asked_1g']}, "
              f"2 MiB pages {a['got_2m']}/{a['asked_2m']} -> {_gib(a['covered_bytes'])} of "
              f"{_gib(a['nbytes'])} in hugepages (rest falls back to THP/4 KiB at load)")


def run(args) -> int:
    import json

    rep = build_report(args)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_text(rep)
    return 0
