"""Proof of placement: which node and which page size back a range of memory.

- `placement(addr, nbytes)` (this process): per VMA overlapping the range, the kernel page size
  comes from /proc/self/smaps (KernelPageSize; AnonHugePages for THP); the node of each page
  comes from move_pages(2) with nodes=NULL, queried once per kernel page.
- `process_placement(pid)` (any process we may read, e.g. a worker): from /proc/PID/numa_maps
  (N<node>=<pages> and kernelpagesize_kB per VMA) plus /proc/PID/smaps for THP.
numa_maps counts THP as base (4 KiB) pages, and move_pages may report -2/-14 for pages that
automatic NUMA balancing is migrating; numa_maps is the fallback view for that case.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from dsd.numa import _sys

_VMA_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s")


@dataclass
class Vma:
    start: int
    end: int
    kernel_page: int = 4096
    anon_huge: int = 0  # AnonHugePages bytes (THP) in this VMA
    rss: int = 0
    hugetlb: int = 0  # Private_Hugetlb + Shared_Hugetlb bytes
    path: str = ""


def read_smaps(pid: int | str = "self") -> list[Vma]:
    out: list[Vma] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _VMA_RE.match(line)
            if m:
                parts = line.split(None, 5)
                out.append(Vma(int(m.group(1), 16), int(m.group(2), 16),
                               path=parts[5].strip() if len(parts) > 5 else ""))
                continue
            if not out:
                continue
            key, _, rest = line.partition(":")
            if key in ("KernelPageSize", "AnonHugePages", "Rss", "Private_Hugetlb", "Shared_Hugetlb"):
                val = int(rest.split()[0]) * 1024
                v = out[-1]
                if key == "KernelPageSize":
                    v.kernel_page = val
                elif key == "AnonHugePages":
                    v.anon_huge = val
                elif key == "Rss":
                    v.rss = val
                else:
                    v.hugetlb += val
    return out


def page_kind(page_bytes: int) -> str:
    return {1 << 30: "1g", 2 << 20: "2m", 4096: "4k"}.get(page_bytes, f"{page_bytes // 1024}k")


@dataclass
class Placement:
    """Bytes per node and per page kind ("1g", "2m", "thp", "4k") for a range or a process."""

    total: int
    bytes_by_node: dict = field(default_factory=dict)
    bytes_by_page: dict = field(default_factory=dict)
    not_present: int = 0  # bytes not faulted in (or not reported)

    def fraction_on(self, node: int) -> float:
        return self.bytes_by_node.get(node, 0) / self.total if self.total else 0.0

    def all_on(self, node: int, kind: str | None = None) -> bool:
        """True if every byte is present on `node` (and, if given, in `kind` pages)."""
        ok = self.bytes_by_node.get(node, 0) == self.total and self.not_present == 0
        return ok and (kind is None or self.bytes_by_page.get(kind, 0) == self.total)

    def to_dict(self) -> dict:
        return {"total": self.total, "bytes_by_node": {str(k): v for k, v in
                                                        sorted(self.bytes_by_node.items())},
                "bytes_by_page": dict(sorted(self.bytes_by_page.items())),
                "not_present": self.not_present}

    def summary(self) -> str:
        nodes = ", ".join(f"node {n}: {b / self.total:.1%}" for n, b in
                          sorted(self.bytes_by_node.items())) if self.total else "-"
        pages = ", ".join(f"{k}: {b / self.total:.1%}" for k, b in
                          sorted(self.bytes_by_page.items())) if self.total else "-"
        extra = f", not present: {self.not_present / self.total:.1%}" if self.not_present else ""
        return f"{self.total} bytes; {nodes}; pages {pages}{extra}"


def _add(d: dict, k, v: int) -> None:
    if v:
        d[k] = d.get(k, 0) + v


def placement(addr: int, nbytes: int) -> Placement:
    """Where the pages of [addr, addr + nbytes) of THIS process are, by node and page size."""
    res = Placement(nbytes)
    end = addr + nbytes
    covered = 0
    for v in read_smaps("self"):
        lo, hi = max(v.start, addr), min(v.end, end)
        if lo >= hi:
            continue
        page = v.kernel_page
        first = lo - lo % page
        pages = np.arange(first, hi, page, dtype=np.uint64)
        status = _sys.move_pages_query(pages)
        # bytes of each queried page that fall inside [lo, hi)
        starts = np.maximum(pages, lo)
        ends = np.minimum(pages + np.uint64(page), hi)
        sizes = (ends - starts).astype(np.int64)
        present = status >= 0
        for node in np.unique(status[present]):
            _add(res.bytes_by_node, int(node), int(sizes[status == node].sum()))
        present_bytes = int(sizes[present].sum())
        res.not_present += int(sizes[~present].sum())
        covered += hi - lo
        if page > 4096:
            _add(res.bytes_by_page, page_kind(page), present_bytes)
        else:
            # THP is per VMA in smaps; pro-rate if the VMA extends past the range (merged VMAs)
            thp = min(present_bytes, v.anon_huge * (hi - lo) // max(v.end - v.start, 1))
            _add(res.bytes_by_page, "thp", thp)
            _add(res.bytes_by_page, "4k", present_bytes - thp)
    res.not_present += nbytes - covered  # unmapped holes
    return res


@dataclass
class NumaMapsEntry:
    start: int
    policy: str
    pages_by_node: dict  # node -> pages of kernelpagesize
    kernel_page: int
    huge: bool
    anon: bool
    path: str = ""


def read_numa_maps(pid: int | str = "self") -> list[NumaMapsEntry]:
    """Parse /proc/PID/numa_maps ('7f.. bind:0 anon=16 dirty=16 N0=16 kernelpagesize_kB=4')."""
    out = []
    with open(f"/proc/{pid}/numa_maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            e = NumaMapsEntry(int(parts[0], 16), parts[1], {}, 4096, False, False)
            for p in parts[2:]:
                if p == "huge":
                    e.huge = True
                elif p.startswith("kernelpagesize_kB="):
                    e.kernel_page = int(p.split("=")[1]) * 1024
                elif p.startswith("anon="):
                    e.anon = True
                elif p.startswith("file="):
                    e.path = p[5:]
                elif p[0] == "N" and "=" in p and p[1:p.index("=")].isdigit():
                    n, c = p[1:].split("=")
                    e.pages_by_node[int(n)] = int(c)
            out.append(e)
    return out


def process_placement(pid: int | str, addr: int | None = None, nbytes: int | None = None,
                      min_vma_bytes: int = 0) -> Placement:
    """Placement of another process's memory (the daemon reports its workers' with this).

    Counts every VMA of the process (or only those starting inside [addr, addr+nbytes)), and
    only VMAs whose resident size is at least `min_vma_bytes` (to look at the big buffers).
    Page sizes: hugetlb from kernelpagesize_kB; THP from smaps AnonHugePages (its node split
    pro-rata, numa_maps does not separate it); the rest is "4k".
    """
    smaps = {v.start: v for v in read_smaps(pid)}
    res = Placement(0)
    for e in read_numa_maps(pid):
        if addr is not None and not (addr <= e.start < addr + (nbytes or 0)):
            continue
        # numa_maps counts THP and 4 KiB pages alike in base pages; hugetlb in huge pages
        b_by_node = {n: c * e.kernel_page for n, c in e.pages_by_node.items()}
        total = sum(b_by_node.values())
        if total == 0 or total < min_vma_bytes:
            continue
        res.total += total
        for n, b in b_by_node.items():
            _add(res.bytes_by_node, n, b)
        if e.kernel_page > 4096:
            _add(res.bytes_by_page, page_kind(e.kernel_page), total)
        else:
            thp = min(total, smaps[e.start].anon_huge if e.start in smaps else 0)
            _add(res.bytes_by_page, "thp", thp)
            _add(res.bytes_by_page, "4k", total - thp)
    return res
