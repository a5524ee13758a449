"""NUMA topology from sysfs, with an injectable root so tests can use fake trees.

Reads, per node under ROOT/sys/devices/system/node/nodeN/:
    cpulist, distance, meminfo (MemTotal/MemFree), hugepages/hugepages-<kB>kB/{nr,free,surplus}_hugepages
and ROOT/sys/kernel/mm/transparent_hugepage/enabled for the THP mode.
A kernel without NUMA support (no node directory) is read as one node 0 holding every online
CPU and /proc/meminfo's memory.

`virtual_nodes(n, topo)` maps N requested workers onto the real nodes; with fewer real nodes
than workers, the CPUs of a node are split between the workers placed on it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from dsd.errors import NumaError

PAGE_2M = 2 << 20
PAGE_1G = 1 << 30
# page-size name <-> bytes, and the sysfs directory name of each hugetlb pool
PAGE_BYTES = {"1g": PAGE_1G, "2m": PAGE_2M}
POOL_DIR = {"1g": "hugepages-1048576kB", "2m": "hugepages-2048kB"}


@dataclass(frozen=True)
class HugePool:
    """One node's pool of one hugetlb page size, in pages (not bytes)."""

    page_bytes: int
    total: int
    free: int
    surplus: int

    @property
    def free_bytes(self) -> int:
        return self.free * self.page_bytes


@dataclass(frozen=True)
class NodeInfo:
    id: int
    cpus: tuple[int, ...]
    mem_total: int  # bytes (see FACTS.md: may under-read in VMs with lazily onlined memory)
    mem_free: int
    distances: tuple[int, ...]  # distance to node at the same index in Topology.node_ids
    pools: dict = field(default_factory=dict)  # "2m"/"1g" -> HugePool
    # physical cores as groups of SMT siblings, e.g. ((0, 64), (1, 65), ...); () if unknown
    cores: tuple[tuple[int, ...], ...] = ()

    def pool(self, kind: str) -> HugePool:
        return self.pools.get(kind) or HugePool(PAGE_BYTES[kind], 0, 0, 0)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeInfo, ...]
    thp: str  # "always" | "madvise" | "never" | "unknown"
    root: str = "/"
    numa_kernel: bool = True  # False: no node dir, synthesised single node

    @property
    def node_ids(self) -> list[int]:
        return [n.id for n in self.nodes]

    def node(self, node_id: int) -> NodeInfo:
        """The node with this id; raises NumaError (before any syscall) if it does not exist."""
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise NumaError(f"NUMA node id must be an integer, got {node_id!r}")
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise NumaError(f"NUMA node {node_id} does not exist on this machine "
                        f"(nodes: {self.node_ids}); use one of those or run `dsd doctor`")

    def distance(self, a: int, b: int) -> int:
        return self.node(a).distances[self.node_ids.index(b)]

    def to_dict(self) -> dict:
        return {
            "thp": self.thp,
            "numa_kernel": self.numa_kernel,
            "nodes": [{
                "id": n.id, "cpus": list(n.cpus), "mem_total": n.mem_total, "mem_free": n.mem_free,
                "distances": list(n.distances),
                "hugepages": {k: {"page_bytes": p.page_bytes, "total": p.total, "free": p.free,
                                  "surplus": p.surplus} for k, p in sorted(n.pools.items())},
            } for n in self.nodes],
        }


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11); empty string -> ()."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            step = 1
            if ":" in b:  # kernel stride syntax 0-7:2
                b, s = b.split(":", 1)
                step = int(s)
            out.extend(range(int(a), int(b) + 1, step))
        else:
            out.append(int(part))
    return tuple(sorted(set(out)))


def format_cpulist(cpus) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    cpus = sorted(cpus)
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def _read(path: str, default: str | None = None) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _read_int(path: str) -> int:
    t = _read(path)
    try:
        return int(t.strip()) if t is not None else 0
    except ValueError:
        return 0


def _meminfo_kb(text: str, key: str) -> int:
    m = re.search(rf"\b{key}:\s+(\d+)\s*kB", text or "")
    return int(m.group(1)) * 1024 if m else 0


def _read_pools(hp_dir: str) -> dict:
    pools = {}
    for kind, d in POOL_DIR.items():
        p = os.path.join(hp_dir, d)
        if os.path.isdir(p):
            pools[kind] = HugePool(PAGE_BYTES[kind], _read_int(f"{p}/nr_hugepages"),
                                   _read_int(f"{p}/free_hugepages"),
                                   _read_int(f"{p}/surplus_hugepages"))
    return pools


def thp_mode(root: str = "/") -> str:
    t = _read(os.path.join(root, "sys/kernel/mm/transparent_hugepage/enabled"))
    m = re.search(r"\[(\w+)\]", t or "")
    return m.group(1) if m else "unknown"


def read_topology(root: str = "/") -> Topology:
    """Read the machine's NUMA topology (or a fake tree under `root`)."""
    base = os.path.join(root, "sys/devices/system/node")
    thp = thp_mode(root)
    ids = []
    if os.path.isdir(base):
        online = _read(os.path.join(base, "online"))
        listed = sorted(int(m.group(1)) for d in os.listdir(base)
                        if (m := re.fullmatch(r"node(\d+)", d)))
        ids = [i for i in listed if i in set(parse_cpulist(online))] if online else listed
    if not ids:
        return _single_node(root, thp)
    nodes = []
    for i in ids:
        d = os.path.join(base, f"node{i}")
        dist_text = (_read(f"{d}/distance") or "").split()
        dist = tuple(int(x) for x in dist_text) if len(dist_text) == len(ids) else \
            tuple(10 if j == i else 20 for j in ids)
        mi = _read(f"{d}/meminfo") or ""
        cpus = parse_cpulist(_read(f"{d}/cpulist") or "")
        nodes.append(NodeInfo(i, cpus, _meminfo_kb(mi, "MemTotal"), _meminfo_kb(mi, "MemFree"),
                              dist, _read_pools(f"{d}/hugepages"), _read_cores(root, cpus)))
    return Topology(tuple(nodes), thp, root, True)


def _read_cores(root: str, cpus: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Group CPUs into physical cores by SMT siblings (thread_siblings_list)."""
    seen: dict[tuple[int, ...], None] = {}
    for c in cpus:
        t = _read(os.path.join(root, f"sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"))
        sib = tuple(x for x in parse_cpulist(t or "") if x in cpus) or (c,)
        seen.setdefault(sib if c in sib else (c,), None)
    return tuple(sorted(seen, key=min))


def _single_node(root: str, thp: str) -> Topology:
    cpus = parse_cpulist(_read(os.path.join(root, "sys/devices/system/cpu/online")) or "")
    if not cpus and root == "/":
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    mi = _read(os.path.join(root, "proc/meminfo")) or ""
    pools = _read_pools(os.path.join(root, "sys/kernel/mm/hugepages"))
    node = NodeInfo(0, cpus, _meminfo_kb(mi, "MemTotal"), _meminfo_kb(mi, "MemAvailable")
                    or _meminfo_kb(mi, "MemFree"), (10,), pools, _read_cores(root, cpus))
    return Topology((node,), thp, root, False)


def node_pool_path(node: int, kind: str, root: str = "/", numa_kernel: bool = True) -> str:
    """sysfs file that sets node `node`'s pool of `kind` ("2m"/"1g") pages."""
    if not numa_kernel:
        return os.path.join(root, "sys/kernel/mm/hugepages", POOL_DIR[kind], "nr_hugepages")
    return os.path.join(root, f"sys/devices/system/node/node{node}/hugepages",
                        POOL_DIR[kind], "nr_hugepages")


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VirtualNode:
    """Where one worker runs: `node` is the real node its memory lives on, `cpus` its CPUs."""

    index: int
    node: int
    cpus: tuple[int, ...]
    shared: int = 1  # how many workers share the real node (1 = node to itself)
    node_cpus: tuple[int, ...] = ()  # all CPUs of the real node when shared (see virtual_nodes)


def _split(cpus: tuple[int, ...], parts: int, cores=()) -> list[tuple[int, ...]]:
    """Split a node's CPUs into `parts` near-equal groups, whole physical cores first.

    SMT siblings stay together (two workers on one core's hyperthreads would fight for the
    same execution units): with CPUs 0-3,8-11 where 0/8, 1/9... are siblings, two workers get
    (0, 1, 8, 9) and (2, 3, 10, 11), not (0-3) and (8-11). With fewer cores than parts the
    split falls back to single CPUs; with fewer CPUs than parts, CPUs are reused round-robin
    (oversubscribed, reported by the caller).
    """
    cpus = tuple(sorted(cpus))
    units = [tuple(sorted(c)) for c in cores] if cores and len(cores) >= parts else \
        [(c,) for c in cpus]
    if len(units) >= parts:
        q, r = divmod(len(units), parts)
        out, start = [], 0
        for k in range(parts):
            n = q + (1 if k < r else 0)
            out.append(tuple(sorted(c for u in units[start:start + n] for c in u)))
            start += n
        return out
    return [(cpus[k % len(cpus)],) for k in range(parts)]


def virtual_nodes(n: int, topo: Topology) -> tuple[list[VirtualNode], str]:
    """N workers -> N VirtualNodes plus a message ("" when each worker has a node to itself).

    Nodes without CPUs (memory-only, e.g. CXL) are never given a worker. With more real nodes
    than workers, the first N nodes (by id) are used. With fewer, workers are spread as evenly
    as possible (node k gets ceil or floor of N/R workers) and the node's CPUs are split; such
    VirtualNodes also carry node_cpus, which a worker uses for the stages it runs alone.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise NumaError(f"the number of NUMA nodes/workers must be a positive integer, got {n!r}")
    real = [nd for nd in topo.nodes if nd.cpus]
    if not real:
        raise NumaError("no NUMA node with CPUs found in sysfs; check /sys/devices/system/node")
    r = len(real)
    msgs = []
    if n <= r:
        out = [VirtualNode(i, nd.id, nd.cpus, 1) for i, nd in enumerate(real[:n])]
        if n < r:
            msgs.append(f"using {n} of {r} NUMA nodes ({', '.join(str(v.node) for v in out)})")
        return out, "; ".join(msgs)
    q, rem = divmod(n, r)
    out = []
    for k, nd in enumerate(real):
        count = q + (1 if k < rem else 0)
        groups = _split(nd.cpus, count, nd.cores)
        for g in groups:
            out.append(VirtualNode(len(out), nd.id, g, count, tuple(nd.cpus) if count > 1 else ()))
        if count > len(nd.cpus):
            msgs.append(f"node {nd.id} has {len(nd.cpus)} CPU(s) for {count} workers: "
                        f"they share CPUs")
    plan = ", ".join(f"worker {v.index}: node {v.node} CPUs {format_cpulist(v.cpus)}" for v in out)
    head = (f"this machine has {r} NUMA node(s) with CPUs but {n} were requested: "
            f"workers share nodes and split their CPUs ({plan}); a stage that one worker runs "
            f"alone (layer ranges, and attention, dense layers and the output head with "
            f"--placement experts) may use all of its node's CPUs, since the others are idle "
            f"then, while --placement rows keeps each worker on its own CPUs; memory is not "
            f"separated between workers on the same node, so expect no NUMA speedup from the "
            f"extra workers")
    return out, "; ".join([head] + msgs)
