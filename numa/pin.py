"""Pin this process (and numba's worker threads) to one node's CPUs and memory.

Order matters: numba's thread pool copies the affinity and memory policy of the thread that
starts it, so call `pin_to_node` before the first parallel numba call. Threads that already
exist are re-pinned through /proc/self/task (sched_setaffinity accepts thread ids), but the
memory policy (set_mempolicy) is per thread and can only be set for the calling thread; the
result says whether numba's pool had already started.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from dsd.errors import NumaError
from dsd.numa import _sys
from dsd.numa.topology import Topology, VirtualNode, format_cpulist, read_topology

POLICIES = {"bind": _sys.MPOL_BIND, "preferred": _sys.MPOL_PREFERRED, "none": None}


@dataclass(frozen=True)
class PinResult:
    node: int
    cpus: tuple[int, ...]
    policy: str
    numba_threads: int | None  # None: numba not imported; set through NUMBA_NUM_THREADS
    numba_pool_started: bool
    notice: str = ""


def _numba_pool_started() -> bool:
    mod = sys.modules.get("numba.np.ufunc.parallel")
    return bool(mod and getattr(mod, "_is_initialized", False))


def pin_to_node(target: int | VirtualNode, cpus=None, policy: str = "preferred",
                topology: Topology | None = None) -> PinResult:
    """Run this process on one node's CPUs (or `cpus`, a subset) with its memory on that node.

    target: a node id or a VirtualNode (from virtual_nodes()) whose cpus are used.
    policy: "bind" (MPOL_BIND: allocations fail/OOM rather than leave the node),
            "preferred" (MPOL_PREFERRED: the node first, others when it is full; the default,
            because weights are bound strictly by allocate() anyway and a worker's scratch
            memory spilling is better than an OOM kill), or "none".
    """
    if policy not in POLICIES:
        raise NumaError(f"unknown memory policy {policy!r}; use one of {', '.join(POLICIES)}")
    topo = topology or read_topology()
    if isinstance(target, VirtualNode):
        node, cpus = target.node, (cpus if cpus is not None else target.cpus)
    else:
        node = target
    info = topo.node(node)  # validates before any syscall
    cpus = tuple(sorted(set(cpus))) if cpus is not None else info.cpus
    if not cpus:
        raise NumaError(f"NUMA node {node} has no CPUs to run on; pick a node with CPUs "
                        f"({[n.id for n in topo.nodes if n.cpus]})")
    bad = [c for c in cpus if c not in info.cpus]
    if bad:
        raise NumaError(f"CPUs {format_cpulist(bad)} are not on NUMA node {node} "
                        f"(its CPUs: {format_cpulist(info.cpus)})")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        raise NumaError(f"cannot pin to CPUs {format_cpulist(cpus)} of node {node}: {e.strerror}"
                        f" (allowed here: {format_cpulist(os.sched_getaffinity(0))}; a cpuset or "
                        f"container limit may exclude them)") from e
    for tid in os.listdir("/proc/self/task"):  # threads started before us (numba, BLAS)
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # thread exited meanwhile
    notice = ""
    if POLICIES[policy] is not None:
        try:
            _sys.set_mempolicy(POLICIES[policy], [node])
        except OSError as e:
            if e.errno in (1, 38) and len(topo.nodes) == 1:
                notice = "set_mempolicy not permitted; one node, memory is local anyway"
            else:
                raise NumaError(f"cannot set memory policy {policy} to node {node}: "
                                f"{e.strerror}") from e
    started = _numba_pool_started()
    threads = None
    if "numba" in sys.modules:
        import numba

        threads = max(1, min(len(cpus), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
    else:
        # numba reads this once at import: its pool will have one thread per pinned CPU
        os.environ["NUMBA_NUM_THREADS"] = str(len(cpus))
    if started and not notice:
        notice = ("numba's thread pool was already running: its threads were re-pinned but keep "
                  "their old memory policy; pin before the first parallel numba call")
    return PinResult(node, cpus, policy, threads, started, notice)


def unpin(topology: Topology | None = None) -> None:
    """Undo pin_to_node for this thread: all CPUs of all nodes, default memory policy."""
    topo = topology or read_topology()
    cpus = sorted({c for n in topo.nodes for c in n.cpus})
    os.sched_setaffinity(0, cpus)
    try:
        _sys.set_mempolicy(_sys.MPOL_DEFAULT, [])
    except OSError:
        pass


def current_binding() -> dict:
    """This thread's CPUs and memory policy (for status/debug output)."""
    try:
        mode, nodes = _sys.get_mempolicy()
    except OSError:
        mode, nodes = -1, []
    names = {_sys.MPOL_DEFAULT: "default", _sys.MPOL_PREFERRED: "preferred",
             _sys.MPOL_BIND: "bind", _sys.MPOL_INTERLEAVE: "interleave"}
    return {"cpus": sorted(os.sched_getaffinity(0)), "policy": names.get(mode, str(mode)),
            "nodes": nodes}
