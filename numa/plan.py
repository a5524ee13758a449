"""How many hugepages each node needs for a model, the commands that reserve them, and --apply.

The per-node split (`model_bytes_per_node`) is a placeholder the daemon's placement planner
will replace: it sums the tensor bytes of the GGUF file and divides them evenly.
The page plan mirrors what allocate(pages="auto") consumes for one buffer of B bytes:
floor(B / 1 GiB) pages of 1 GiB, then ceil(rest / 2 MiB) pages of 2 MiB.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dsd.errors import DsdError, NumaError
from dsd.numa.topology import (PAGE_1G, PAGE_2M, Topology, node_pool_path, read_topology,
                               virtual_nodes)


def model_bytes(model_path) -> int:
    """Sum of the tensor data sizes of a GGUF model (all parts of a split model)."""
    try:
        from dsd.shard.gguf_file import open_gguf
    except ImportError:  # loader not available: gguf-py's reader
        open_gguf = None
    if open_gguf is not None:
        with open_gguf(model_path) as m:
            ts = m.tensors.values() if isinstance(m.tensors, dict) else m.tensors
            return int(sum(t.nbytes for t in ts))
    from gguf import GGUFReader

    if not os.path.exists(model_path):
        raise DsdError(f"model file {model_path} does not exist; give the path of a .gguf file")
    return int(sum(int(t.n_bytes) for t in GGUFReader(model_path).tensors))


def model_bytes_per_node(model_path, nodes: int) -> list[int]:
    """Bytes of weights each of `nodes` workers holds (even split; the planner replaces this)."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise NumaError(f"node count must be a positive integer, got {nodes!r}")
    total = model_bytes(model_path)
    q, r = divmod(total, nodes)
    return [q + (1 if i < r else 0) for i in range(nodes)]


@dataclass
class NodeNeed:
    node: int  # real node id
    nbytes: int  # bytes of all workers placed on this node
    pages_1g: int
    pages_2m: int
    pages_2m_only: int  # alternative: the same bytes in 2 MiB pages only
    have_1g_free: int
    have_2m_free: int
    target_1g: int  # nr_hugepages to write (used pages kept + needed)
    target_2m: int
    path_1g: str
    path_2m: str
    used_1g: int = 0  # pages of the pool in use by others at planning time (kept)
    used_2m: int = 0

    def commands(self) -> list[str]:
        out = []
        if self.pages_1g > self.have_1g_free:
            out.append(f"echo {self.target_1g} > {self.path_1g}")
        if self.pages_2m > self.have_2m_free:
            out.append(f"echo {self.target_2m} > {self.path_2m}")
        return out


def pages_for(nbytes: int) -> tuple[int, int]:
    """(1 GiB pages, 2 MiB pages) that allocate(pages='auto') uses for nbytes."""
    n1 = nbytes // PAGE_1G
    return n1, -(-(nbytes - n1 * PAGE_1G) // PAGE_2M)


def hugepage_plan(bytes_per_worker: list[int], topo: Topology | None = None) -> tuple[list[NodeNeed], str]:
    """Per real node: pages needed, what is free, the nr_hugepages targets and commands.

    Workers map to nodes with virtual_nodes(); workers sharing a node add up. Returns the
    needs and virtual_nodes' message.
    """
    topo = topo or read_topology()
    vnodes, msg = virtual_nodes(len(bytes_per_worker), topo)
    per_node: dict[int, list[int]] = {}
    for v, b in zip(vnodes, bytes_per_worker):
        per_node.setdefault(v.node, []).append(b)
    needs = []
    for node, parts in sorted(per_node.items()):
        info = topo.node(node)
        # each worker allocates its own buffer, so pages are counted per worker
        n1 = sum(pages_for(b)[0] for b in parts)
        n2 = sum(pages_for(b)[1] for b in parts)
        p1, p2 = info.pool("1g"), info.pool("2m")
        needs.append(NodeNeed(
            node, sum(parts), n1, n2, sum(-(-b // PAGE_2M) for b in parts), p1.free, p2.free,
            (p1.total - p1.free) + n1 if n1 > p1.free else p1.total,
            (p2.total - p2.free) + n2 if n2 > p2.free else p2.total,
            node_pool_path(node, "1g", "/", topo.numa_kernel),
            node_pool_path(node, "2m", "/", topo.numa_kernel),
            p1.total - p1.free, p2.total - p2.free))
    return needs, msg


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _compact(root: str) -> None:
    try:
        _write(os.path.join(root, "proc/sys/vm/compact_memory"), "1")
    except OSError:
        pass


def _grow(path: str, target: int, root: str, compact: bool) -> int:
    """Raise a pool to `target` pages (never lower it); returns what the kernel gave. If it
    gives fewer, compact memory (huge pages need physically contiguous memory) and retry."""
    if not os.path.exists(path):
        return 0
    for attempt in range(2 if compact else 1):
        have = _read_int(path)
        if have >= target:
            return have
        if compact:
            _compact(root)
        try:
            _write(path, str(target))
        except OSError:
            pass  # the kernel may refuse outright; the re-read shows what we have
        time.sleep(0.05)
    return _read_int(path)


def apply_plan(needs: list[NodeNeed], root: str = "/", compact: bool = True) -> list[dict]:
    """Reserve the planned pages (root only). 1 GiB pages first (they need contiguous memory,
    so memory is compacted first); if the kernel gives fewer, the 2 MiB target grows to cover
    the shortfall. Returns per node what was asked and what the kernel actually gave."""
    if root == "/" and os.geteuid() != 0:
        raise NumaError("reserving hugepages needs root: rerun `dsd doctor --apply` with sudo, "
                        "or run the printed echo commands as root")
    topo = read_topology(root)
    report = []
    for need in needs:
        p1 = node_pool_path(need.node, "1g", root, topo.numa_kernel)
        p2 = node_pool_path(need.node, "2m", root, topo.numa_kernel)
        got_1g_total = _grow(p1, need.target_1g, root, compact)
        used_1g = need.used_1g
        got_1g = max(0, min(need.pages_1g, got_1g_total - used_1g))
        short = need.nbytes - got_1g * PAGE_1G
        want_2m = max(0, -(-short // PAGE_2M)) if got_1g < need.pages_1g else need.pages_2m
        target_2m = need.used_2m + want_2m if want_2m > need.have_2m_free else need.target_2m
        got_2m_total = _grow(p2, target_2m, root, compact)
        used_2m = need.used_2m
        got_2m = max(0, min(want_2m, got_2m_total - used_2m))
        report.append({"node": need.node, "asked_1g": need.pages_1g, "got_1g": got_1g,
                       "asked_2m": want_2m, "got_2m": got_2m,
                       "nr_hugepages_1g": got_1g_total, "nr_hugepages_2m": got_2m_total,
                       "covered_bytes": min(need.nbytes, got_1g * PAGE_1G + got_2m * PAGE_2M),
                       "nbytes": need.nbytes})
    return report
