"""dsd.numa: NUMA topology, pinning, node-local hugepage memory with proof, and model loading.

    topo = read_topology()                       # sysfs; read_topology(root) for fake trees
    vnodes, msg = virtual_nodes(4, topo)         # 4 workers on however many real nodes exist
    pin_to_node(vnodes[i])                       # CPUs + numba threads + memory policy
    buf = allocate(nbytes, node, pages="auto")   # 1g -> 2m -> thp -> 4k, pre-faulted, bound
    buf.placement().all_on(node)                 # proof via move_pages + smaps
    load_file_range(path, off, n, buf)           # preadv into buf, then drop page cache
See numa/README.md for why raw syscalls and not libnuma.
"""
from dsd.numa.alloc import NodeBuffer, Segment, allocate, live_bytes
from dsd.numa.load import LoadStats, load_file_range
from dsd.numa.pin import PinResult, current_binding, pin_to_node, unpin
from dsd.numa.plan import apply_plan, hugepage_plan, model_bytes, model_bytes_per_node
from dsd.numa.proof import Placement, placement, process_placement, read_numa_maps
from dsd.numa.topology import (HugePool, NodeInfo, Topology, VirtualNode, parse_cpulist,
                               read_topology, virtual_nodes)

__all__ = [
    "NodeBuffer", "Segment", "allocate", "live_bytes", "LoadStats", "load_file_range",
    "PinResult", "current_binding", "pin_to_node", "unpin", "apply_plan", "hugepage_plan",
    "model_bytes", "model_bytes_per_node", "Placement", "placement", "process_placement",
    "read_numa_maps", "HugePool", "NodeInfo", "Topology", "VirtualNode", "parse_cpulist",
    "read_topology", "virtual_nodes",
]
