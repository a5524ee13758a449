"""Thin ctypes layer over libc: mmap/munmap/madvise and the NUMA syscalls.

Why raw syscalls and not libnuma: see numa/README.md. Every function here takes already
validated arguments (node ids are checked against the sysfs topology by the callers) and
raises OSError with errno on failure; nothing here can crash the process on bad input
except a bad *address*, which only dsd.numa itself passes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# --- constants (x86-64 / aarch64 Linux; asm-generic values) ---------------------------------
PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000  # only used for the PROT_NONE address-space placeholder, never for data
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MAP_HUGE_2MB = 21 << MAP_HUGE_SHIFT
MAP_HUGE_1GB = 30 << MAP_HUGE_SHIFT

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault in writable pages now, report failure as errno

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
MPOL_F_NODE, MPOL_F_ADDR = 1 << 0, 1 << 1
MPOL_MF_STRICT = 1 << 0

# syscall numbers per architecture (libc.syscall takes the raw number)
_SYSCALLS = {
    "x86_64": {"mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "move_pages": 279},
    "aarch64": {"mbind": 235, "set_mempolicy": 237, "get_mempolicy": 236, "move_pages": 239},
}
NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

MAP_FAILED = ctypes.c_void_p(-1).value
PAGE_4K = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def mmap(addr: int | None, length: int, prot: int, flags: int) -> int:
    ctypes.set_errno(0)
    p = _libc.mmap(addr, length, prot, flags, -1, 0)
    if p is None or p == MAP_FAILED:
        _raise("mmap")
    return int(p)


def munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        _raise("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        _raise(f"madvise({advice})")


def nodemask(nodes: list[int]) -> tuple[ctypes.Array, int]:
    """Bitmask of c_ulong words and the `maxnode` argument the kernel expects.

    The kernel reads maxnode-1 bits (historic off-by-one), so pass one more than the bit count.
    """
    nwords = max(nodes) // 64 + 1 if nodes else 1
    mask = (ctypes.c_ulong * nwords)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    return mask, nwords * 64 + 1


def mbind(addr: int, length: int, mode: int, nodes: list[int], flags: int = 0) -> None:
    mask, maxnode = nodemask(nodes)
    r = _libc.syscall(ctypes.c_long(NR["mbind"]), ctypes.c_void_p(addr), ctypes.c_ulong(length),
                      ctypes.c_int(mode), mask, ctypes.c_ulong(maxnode), ctypes.c_uint(flags))
    if r != 0:
        _raise("mbind")


def set_mempolicy(mode: int, nodes: list[int]) -> None:
    mask, maxnode = nodemask(nodes)
    if mode == MPOL_DEFAULT:
        r = _libc.syscall(ctypes.c_long(NR["set_mempolicy"]), ctypes.c_int(mode), None,
                          ctypes.c_ulong(0))
    else:
        r = _libc.syscall(ctypes.c_long(NR["set_mempolicy"]), ctypes.c_int(mode), mask,
                          ctypes.c_ulong(maxnode))
    if r != 0:
        _raise("set_mempolicy")


def get_mempolicy(max_nodes: int = 1024) -> tuple[int, list[int]]:
    """The calling thread's policy mode and node set."""
    mode = ctypes.c_int(0)
    nwords = max_nodes // 64
    mask = (ctypes.c_ulong * nwords)()
    r = _libc.syscall(ctypes.c_long(NR["get_mempolicy"]), ctypes.byref(mode), mask,
                      ctypes.c_ulong(nwords * 64), None, ctypes.c_ulong(0))
    if r != 0:
        _raise("get_mempolicy")
    nodes = [w * 64 + b for w in range(nwords) for b in range(64) if mask[w] >> b & 1]
    return mode.value, nodes


def move_pages_query(addrs: list[int] | "object") -> list[int]:
    """Node of each page containing addrs[i] (move_pages with nodes=NULL only queries).

    Status per page: node id >= 0, or -errno (-2 ENOENT: not faulted yet, -14 EFAULT: no page).
    `addrs` may be a numpy uint64 array (used as is, no Python list for millions of pages).
    """
    import numpy as np

    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    status = np.full(len(a), -99, dtype=np.int32)
    if len(a) == 0:
        return status
    r = _libc.syscall(ctypes.c_long(NR["move_pages"]), ctypes.c_int(0), ctypes.c_ulong(len(a)),
                      ctypes.c_void_p(a.ctypes.data), None, ctypes.c_void_p(status.ctypes.data),
                      ctypes.c_int(0))
    if r < 0:
        _raise("move_pages")
    return status


def numa_syscalls_work() -> bool:
    """False in containers whose seccomp filter blocks the NUMA syscalls (or non-NUMA kernels)."""
    try:
        get_mempolicy()
        return True
    except OSError:
        return False


def libnuma_version() -> str | None:
    """Version string of libnuma if installed (reported only; dsd does not need it)."""
    name = ctypes.util.find_library("numa")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    # libnuma exports no version function; the soname is what users can act on.
    return name if hasattr(lib, "numa_available") else None


# glibc malloc: KV caches are numpy buffers that grow by doubling and are dropped when a sequence
# ends. With glibc's default *dynamic* mmap threshold (it rises to the size of the last freed
# mmapped block, up to 32 MiB), later buffers of a few MiB come from the heap, and a heap whose
# top block is still in use is never given back: a worker stayed at its peak RSS after its
# sequences finished. A fixed threshold makes every buffer >= it a mapping of its own, unmapped
# at free; malloc_trim returns what the heap holds free.
M_MMAP_THRESHOLD = -3
BIG_BLOCK = 256 << 10


def big_blocks_unmap_at_free(threshold: int = BIG_BLOCK) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold); False where libc is not glibc."""
    fn = getattr(_libc, "mallopt", None)
    return bool(fn and fn(M_MMAP_THRESHOLD, int(threshold)) == 1)


def trim_heap() -> bool:
    """malloc_trim(0): give the heap's free pages back to the kernel; False if nothing was."""
    fn = getattr(_libc, "malloc_trim", None)
    return bool(fn and fn(0) == 1)
