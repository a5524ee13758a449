"""Checks that run INSIDE the 2-node guest (imported by the script test_numa_vm sends).

Each check returns a dict of observations; main() writes them all as JSON so the
host-side tests can assert on them one by one.  Uses raw syscalls through ctypes
(not dsd.numa) so the VM itself is validated independently of the code under test.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time
import traceback

SYS_MBIND = 237           # x86_64
MPOL_BIND = 2
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000  # not exported by Python 3.11 mmap
PAGE = mmap.PAGESIZE
HUGE = 2 << 20
NODE_SYS = "/sys/devices/system/node"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def mbind(addr: int, length: int, node: int) -> None:
    """Bind [addr, addr+length) to one node (MPOL_BIND), before first touch."""
    mask = ctypes.c_ulong(1 << node)
    r = _libc.syscall(ctypes.c_long(SYS_MBIND), ctypes.c_void_p(addr), ctypes.c_ulong(length),
                      ctypes.c_int(MPOL_BIND), ctypes.byref(mask), ctypes.c_ulong(64),
                      ctypes.c_uint(0))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mbind(node={node}): {os.strerror(e)}")


def numa_maps_line(addr: int) -> str:
    """The /proc/self/numa_maps line of the mapping that starts at addr."""
    want = f"{addr:x} "
    with open("/proc/self/numa_maps") as f:
        for line in f:
            if line.startswith(want):
                return line.strip()
    raise LookupError(f"no numa_maps line for {addr:#x}")


def node_counts(line: str) -> dict[str, int]:
    """{'N0': pages, 'N1': pages} from a numa_maps line."""
    out = {}
    for tok in line.split():
        if tok[:1] == "N" and "=" in tok and tok[1:tok.index("=")].isdigit():
            k, v = tok.split("=")
            out[k] = int(v)
    return out


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def check_topology() -> dict:
    nodes = sorted(d for d in os.listdir(NODE_SYS) if d.startswith("node") and d[4:].isdigit())
    res = {"nodes": nodes, "online": open(f"{NODE_SYS}/online").read().strip()}
    for n in nodes:
        res[f"{n}_cpulist"] = open(f"{NODE_SYS}/{n}/cpulist").read().strip()
        res[f"{n}_cpus"] = sorted(d for d in os.listdir(f"{NODE_SYS}/{n}")
                                  if d.startswith("cpu") and d[3:].isdigit())
        for line in open(f"{NODE_SYS}/{n}/meminfo"):
            if "MemTotal" in line:
                res[f"{n}_memtotal_kb"] = int(line.split()[-2])
    res["numa_balancing"] = open("/proc/sys/kernel/numa_balancing").read().strip()
    res["cpu_count"] = os.cpu_count()
    return res


def check_mbind_node1() -> dict:
    n = 4096 * PAGE                  # 16 MiB of 4 KiB pages
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = _addr(m)
    mbind(a, n, 1)
    for off in range(0, n, PAGE):    # first touch after binding places the pages
        m[off] = 1
    line = numa_maps_line(a)
    return {"line": line, "counts": node_counts(line), "pages": n // PAGE}


def check_first_touch_cpu1() -> dict:
    """Default (local) policy: a thread pinned to CPU 1 gets node-1 pages."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        n = 1024 * PAGE
        # MAP_NORESERVE gives the mapping its own VMA flags, so the kernel cannot merge it with
        # a neighbouring anonymous VMA whose pages sit on node 0 (numa_maps reports per VMA)
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        for off in range(0, n, PAGE):
            m[off] = 1
        line = numa_maps_line(_addr(m))
    finally:
        os.sched_setaffinity(0, old)
    return {"line": line, "counts": node_counts(line), "pages": n // PAGE}


def check_hugetlb_node1() -> dict:
    pools = {i: f"{NODE_SYS}/node{i}/hugepages/hugepages-2048kB/nr_hugepages" for i in (0, 1)}
    with open(pools[0], "w") as f:
        f.write("0")
    with open(pools[1], "w") as f:
        f.write("4")
    res = {"pool_node0": int(open(pools[0]).read()), "pool_node1": int(open(pools[1]).read())}
    n = 2 * HUGE                     # a multiple of the huge page size, or munmap fails
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        a = _addr(m)
        mbind(a, n, 1)
        for off in range(0, n, HUGE):
            m[off] = 1
        line = numa_maps_line(a)
        res.update(line=line, counts=node_counts(line), hugepages=n // HUGE)
        res["free_node1_after"] = int(open(
            f"{NODE_SYS}/node1/hugepages/hugepages-2048kB/free_hugepages").read())
    finally:
        m.close()
        with open(pools[1], "w") as f:
            f.write("0")
    return res


def check_imports() -> dict:
    t = time.perf_counter()
    import numpy
    t_np = time.perf_counter() - t
    t = time.perf_counter()
    import dsd.shard
    t_dsd = time.perf_counter() - t
    return {"numpy_s": t_np, "dsd_shard_s": t_dsd, "dsd_shard_file": dsd.shard.__file__,
            "numpy_version": numpy.__version__, "sum": float(numpy.arange(10).sum())}


def check_numba_cache() -> dict:
    """Load the host-warmed cache of guest_numba.add_one (see README: warming)."""
    t = time.perf_counter()
    import numba
    t_imp = time.perf_counter() - t
    from . import guest_numba
    t = time.perf_counter()
    val = guest_numba.run()
    t_call = time.perf_counter() - t
    st = guest_numba.add_one.stats
    return {"import_s": t_imp, "first_call_s": t_call, "value": val,
            "cache_hits": sum(st.cache_hits.values()), "cache_misses": sum(st.cache_misses.values()),
            "cache_dir": os.environ.get("NUMBA_CACHE_DIR"), "numba": numba.__version__}


CHECKS = {"topology": check_topology, "mbind_node1": check_mbind_node1,
          "first_touch_cpu1": check_first_touch_cpu1, "hugetlb_node1": check_hugetlb_node1,
          "imports": check_imports, "numba_cache": check_numba_cache}


def main(out_path: str, names: list[str] | None = None) -> int:
    results, failed = {}, 0
    for name in names or list(CHECKS):
        t = time.perf_counter()
        try:
            results[name] = CHECKS[name]()
        except Exception:
            failed += 1
            results[name] = {"error": traceback.format_exc()}
            print(f"check {name} failed:\n{results[name]['error']}", file=sys.stderr)
        results[name]["elapsed_s"] = time.perf_counter() - t
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return failed
