"""Node-local, pre-faulted memory in the largest pages available: `allocate()` -> NodeBuffer.

A NodeBuffer is ONE contiguous virtual range, possibly made of several adjacent mappings
("segments"), in this order:  [1 GiB hugetlb pages][2 MiB hugetlb pages][THP or 4 KiB tail].
How it is built (why each step):
  1. a PROT_NONE placeholder reserves the address range, aligned to the largest page size
     (1 GiB pages need 1 GiB-aligned addresses); it commits no memory;
  2. each segment is mapped over it with MAP_FIXED, MAP_PRIVATE|MAP_ANONYMOUS (+MAP_HUGETLB and
     the page-size bits), never MAP_NORESERVE (a short pool must fail, not SIGBUS later);
  3. mbind(MPOL_BIND, node) BEFORE the first touch, so the pages come from that node (for
     hugetlb: from that node's pool);
  4. madvise(MADV_POPULATE_WRITE) faults every page in now; if the node's pool is short this
     returns an errno we catch, and `auto` retries that segment with fewer pages of that size.
Sizes are rounded up to the segment's page size (a hugetlb mapping that is not a page
multiple cannot be unmapped and leaks). Memory is returned by free(), when the last numpy view
dies after free(), when the buffer is garbage-collected, and by the kernel at process exit.
"""
from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass

from dsd.errors import HugePagePoolError, NumaError
from dsd.numa import _sys
from dsd.numa.topology import PAGE_1G, PAGE_2M, Topology, node_pool_path, read_topology

PAGE_4K = _sys.PAGE_4K
PAGE_KINDS = ("auto", "1g", "2m", "thp", "4k")
_KIND_PAGE = {"1g": PAGE_1G, "2m": PAGE_2M, "thp": PAGE_4K, "4k": PAGE_4K}
_KIND_FLAGS = {"1g": _sys.MAP_HUGETLB | _sys.MAP_HUGE_1GB, "2m": _sys.MAP_HUGETLB | _sys.MAP_HUGE_2MB,
               "thp": 0, "4k": 0}
_notices: set[str] = set()


def _notice(msg: str) -> None:
    """One-line notice, printed once per process."""
    if msg not in _notices:
        _notices.add(msg)
        print(f"dsd.numa: {msg}", file=sys.stderr)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Segment:
    offset: int  # from the buffer's start
    nbytes: int  # mapped length, a multiple of the page size
    page_kind: str  # "1g" | "2m" | "thp" | "4k"


class _Mapping:
    """Owns the address range. numpy arrays made from it keep it alive (it is their .base)."""

    _live: "weakref.WeakSet[_Mapping]" = weakref.WeakSet()

    def __init__(self, addr: int, length: int):
        self.addr, self.length, self.closed = addr, length, False
        self._lock = threading.Lock()
        _Mapping._live.add(self)

    @property
    def __array_interface__(self) -> dict:
        if self.closed:
            raise ValueError("NodeBuffer memory has been freed")
        return {"shape": (self.length,), "typestr": "|u1", "data": (self.addr, False), "version": 3}

    def unmap(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                # One munmap over the whole range: every segment boundary is aligned to the
                # page size of the segments on both sides, so hugetlb VMAs unmap cleanly.
                _sys.munmap(self.addr, self.length)

    def __del__(self):
        try:
            self.unmap()
        except Exception:
            pass


def live_bytes() -> int:
    """Bytes currently mapped by NodeBuffers of this process (for leak checks)."""
    return sum(m.length for m in list(_Mapping._live) if not m.closed)


class NodeBuffer:
    """Pre-faulted memory bound to one NUMA node. Use `.array(dtype, shape)` or `.memoryview()`."""

    def __init__(self, mapping: _Mapping, nbytes: int, node: int, segments: list[Segment]):
        self._m: _Mapping | None = mapping
        self.address = mapping.addr
        self.nbytes = nbytes  # requested bytes (usable); mapped_bytes >= nbytes
        self.mapped_bytes = mapping.length
        self.node = node
        self.segments = tuple(segments)

    @property
    def page_kind(self) -> str:
        kinds = {s.page_kind for s in self.segments}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.segments:
            out[s.page_kind] = out.get(s.page_kind, 0) + s.nbytes
        return out

    def report(self) -> str:
        parts = ", ".join(f"{human(b)} in {k} pages" for k, b in self.bytes_by_kind().items())
        return f"{human(self.nbytes)} on node {self.node}: {parts}"

    @property
    def closed(self) -> bool:
        return self._m is None or self._m.closed

    def array(self, dtype="uint8", shape=None, offset: int = 0):
        """A numpy view of the buffer (bytes [offset, offset + prod(shape)*itemsize))."""
        import numpy as np

        if self._m is None or self._m.closed:
            raise ValueError("NodeBuffer has been freed")
        dt = np.dtype(dtype)
        raw = np.asarray(self._m)[: self.nbytes]
        if shape is None:
            count = (self.nbytes - offset) // dt.itemsize
            shape = (count,)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset < 0 or offset + need > self.nbytes:
            raise ValueError(f"view of {need} bytes at offset {offset} exceeds the buffer's "
                             f"{self.nbytes} bytes")
        return raw[offset: offset + need].view(dt).reshape(shape)

    def memoryview(self) -> memoryview:
        return memoryview(self.array())

    def placement(self):
        """Proof: bytes per node and page sizes actually backing this buffer."""
        from dsd.numa.proof import placement

        return placement(self.address, self.mapped_bytes)

    def free(self) -> bool:
        """Unmap now; if numpy views are still alive, unmap when the last one dies.

        Returns True if the memory was returned immediately.
        """
        m, self._m = self._m, None
        if m is None or m.closed:
            return True
        # refs: `m` local + getrefcount's argument; anything more is a live numpy view.
        if sys.getrefcount(m) > 2:
            return False
        m.unmap()
        return True

    def __enter__(self) -> "NodeBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __repr__(self) -> str:
        state = "freed" if self.closed else f"at {self.address:#x}"
        return f"<NodeBuffer {self.report()} {state}>"


# ----------------------------------------------------------------------------------------------
def _bind(addr: int, length: int, node: int, topo: Topology) -> None:
    try:
        _sys.mbind(addr, length, _sys.MPOL_BIND, [node])
    except OSError as e:
        if e.errno in (1, 38) and len([n for n in topo.nodes if n.mem_total]) <= 1:
            # seccomp-filtered container (EPERM/ENOSYS) on a one-node machine: binding is moot.
            _notice("mbind is not permitted here; one memory node, so memory is local anyway")
            return
        if e.errno in (1, 38):
            raise NumaError(f"mbind to node {node} is not permitted ({e.strerror}); in a "
                            f"container allow the NUMA syscalls (e.g. --cap-add SYS_NICE or an "
                            f"unconfined seccomp profile)") from e
        raise NumaError(f"mbind to node {node} failed: {e.strerror}") from e


POPULATE_STEP = 1 << 30   # pre-fault 1 GiB per madvise so a progress bar can move (a multiple of every page size)


def _populate(addr: int, length: int, progress=None) -> None:
    """Fault in [addr, addr+length); progress(nbytes) after each step (pre-faulting hundreds of
    GB takes minutes: zeroing runs at a few GB/s per thread)."""
    try:
        for off in range(0, length, POPULATE_STEP):
            n = min(POPULATE_STEP, length - off)
            _sys.madvise(addr + off, n, _sys.MADV_POPULATE_WRITE)
            if progress is not None:
                progress(n)
    except OSError as e:
        if e.errno != 22:  # EINVAL: kernel < 5.14 does not know POPULATE_WRITE
            raise
        _notice("kernel lacks MADV_POPULATE_WRITE (Linux >= 5.14); touching pages instead")
        import ctypes

        step = PAGE_4K
        for off in range(0, length, step):
            ctypes.memset(addr + off, 0, 1)
            if progress is not None and (off + step) % POPULATE_STEP == 0:
                progress(POPULATE_STEP)


def _map_segment(addr: int, length: int, kind: str, node: int, topo: Topology, progress=None) -> None:
    """Map, bind and pre-fault one segment at a fixed address; raises OSError on failure,
    leaving the range unmapped-and-replaced by the placeholder."""
    flags = _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS | _sys.MAP_FIXED | _KIND_FLAGS[kind]
    try:
        _sys.mmap(addr, length, _sys.PROT_READ | _sys.PROT_WRITE, flags)
        if kind == "thp":
            _sys.madvise(addr, length, _sys.MADV_HUGEPAGE)
        elif kind == "4k":
            _sys.madvise(addr, length, _sys.MADV_NOHUGEPAGE)
        _bind(addr, length, node, topo)
        _populate(addr, length, progress)
    except BaseException:
        _placeholder(addr, length)
        raise


def _placeholder(addr: int | None, length: int) -> int:
    flags = _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS | _sys.MAP_NORESERVE
    if addr is not None:
        flags |= _sys.MAP_FIXED
    return _sys.mmap(addr, length, _sys.PROT_NONE, flags)


def _reserve_range(length: int, align: int) -> int:
    """An `align`-aligned PROT_NONE range of `length` bytes (slack unmapped)."""
    base = _placeholder(None, length + align)
    start = _round_up(base, align)
    if start > base:
        _sys.munmap(base, start - base)
    tail = base + length + align - (start + length)
    if tail:
        _sys.munmap(start + length, tail)
    return start


def _pool_hint(node: int, kind: str, pages: int, topo: Topology) -> str:
    path = node_pool_path(node, kind, "/", topo.numa_kernel)
    have = topo.node(node).pool(kind)
    return (f"node {node}'s {kind} pool has {have.free} free of {have.total}; reserve more with "
            f"`echo {have.total + max(pages - have.free, 0)} > {path}` (as root) or run "
            f"`dsd doctor --model PATH --apply`")


def allocate(nbytes: int, node: int, pages: str = "auto",
             topology: Topology | None = None, progress=None) -> NodeBuffer:
    """Allocate `nbytes` on NUMA `node`, pre-faulted, in the requested page size.

    pages: "1g" / "2m" strict hugetlb (HugePagePoolError if the node's pool is short),
           "thp" (transparent huge pages, 4 KiB where the kernel has none), "4k",
           "auto": 1 GiB pages while the node's pool lasts, then 2 MiB, then THP (4 KiB if
           THP is off); the result may be several segments, see NodeBuffer.report().
    progress: optional callable(done_bytes, total_bytes) while pages are pre-faulted.
    """
    if pages not in PAGE_KINDS:
        raise NumaError(f"unknown page size {pages!r}; use one of {', '.join(PAGE_KINDS)}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise NumaError(f"allocation size must be a positive integer number of bytes, got {nbytes!r}")
    topo = topology or read_topology()
    info = topo.node(node)  # validates the node id before any syscall
    if not info.mem_total and not any(p.total for p in info.pools.values()):
        raise NumaError(f"NUMA node {node} has no memory (CPU-only node); allocate on a node "
                        f"with memory: {[n.id for n in topo.nodes if n.mem_total]}")
    page = _KIND_PAGE[pages] if pages != "auto" else PAGE_2M
    length = _round_up(nbytes, page)
    step = None
    if progress is not None:
        faulted = [0]

        def step(n: int) -> None:   # a failed huge-page try is retried smaller: never past 100%
            faulted[0] = min(faulted[0] + n, length)
            progress(faulted[0], length)
    if pages == "auto":
        return _allocate_auto(nbytes, node, topo, step)
    align = page if page > PAGE_4K else (PAGE_2M if pages == "thp" else PAGE_4K)
    start = _reserve_range(length, align)
    try:
        _map_segment(start, length, pages, node, topo, step)
    except OSError as e:
        _sys.munmap(start, length)
        if pages in ("1g", "2m"):
            raise HugePagePoolError(
                f"cannot get {length // page} {pages} page(s) ({human(length)}) on node {node}: "
                f"{e.strerror}; {_pool_hint(node, pages, length // page, read_topology(topo.root))}"
            ) from e
        raise NumaError(f"cannot allocate {human(length)} on node {node} ({pages} pages): "
                        f"{e.strerror}; free memory on that node or use a smaller model") from e
    except BaseException:  # e.g. NumaError from a refused mbind: give the range back
        _sys.munmap(start, length)
        raise
    return NodeBuffer(_Mapping(start, length), nbytes, node, [Segment(0, length, pages)])


def _try_huge(start: int, cursor: int, want: int, kind: str, node: int, topo: Topology,
              progress=None) -> int:
    """Map up to `want` pages of `kind` at start+cursor; return how many were obtained."""
    page = _KIND_PAGE[kind]
    n = want
    while n > 0:
        try:
            _map_segment(start + cursor, n * page, kind, node, topo, progress)
            return n
        except OSError:
            # The free count in sysfs may be stale or the pages on another node: retry with
            # what the kernel says is free now, at most the previous attempt minus one.
            fresh = read_topology(topo.root).node(node).pool(kind).free
            n = min(n - 1, fresh)
    return 0


def _allocate_auto(nbytes: int, node: int, topo: Topology, progress=None) -> NodeBuffer:
    length = _round_up(nbytes, PAGE_2M)
    info = topo.node(node)
    want_1g = min(length // PAGE_1G, info.pool("1g").free)
    align = PAGE_1G if want_1g else PAGE_2M
    start = _reserve_range(length, align)
    segments: list[Segment] = []
    cursor = 0
    try:
        got = _try_huge(start, cursor, want_1g, "1g", node, topo, progress) if want_1g else 0
        if got:
            segments.append(Segment(cursor, got * PAGE_1G, "1g"))
            cursor += got * PAGE_1G
        want_2m = min((length - cursor) // PAGE_2M, info.pool("2m").free)
        got = _try_huge(start, cursor, want_2m, "2m", node, topo, progress) if want_2m else 0
        if got:
            segments.append(Segment(cursor, got * PAGE_2M, "2m"))
            cursor += got * PAGE_2M
        if cursor < length:
            kind = "4k" if topo.thp == "never" else "thp"
            try:
                _map_segment(start + cursor, length - cursor, kind, node, topo, progress)
            except OSError as e:
                raise NumaError(f"cannot allocate {human(length - cursor)} more on node {node} "
                                f"({kind} pages): {e.strerror}; free memory on that node") from e
            segments.append(Segment(cursor, length - cursor, kind))
    except BaseException:
        _sys.munmap(start, length)
        raise
    return NodeBuffer(_Mapping(start, length), nbytes, node, segments)
