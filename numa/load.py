"""Copy a byte range of a file into node-local memory, then drop it from the page cache.

Large sequential os.preadv calls read straight into a memoryview of the destination (no
intermediate buffer), and each finished chunk is dropped from the page cache with
posix_fadvise(DONTNEED), so the model is never resident twice (page cache + our copy).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dsd.errors import DsdError

CHUNK = 32 << 20  # 32 MiB: past ~8 MiB larger reads gain nothing, smaller ones add syscalls
FOLIO_MARGIN = 4 << 20  # > the largest page-cache folio (PMD size, 2 MiB on x86-64)


@dataclass(frozen=True)
class LoadStats:
    nbytes: int
    seconds: float
    chunks: int
    dropped_cache: bool

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return f"{self.nbytes / (1 << 20):.1f} MiB in {self.seconds:.3f} s ({self.gbps:.2f} GB/s)"


def _dest_view(dest) -> memoryview:
    """A writable byte view of a NodeBuffer, numpy array, bytearray or memoryview."""
    if hasattr(dest, "memoryview") and callable(dest.memoryview):
        mv = dest.memoryview()
    else:
        mv = memoryview(dest)
    if mv.readonly:
        raise ValueError("destination buffer is read-only")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def load_file_range(path, offset: int, nbytes: int, dest_buffer, dest_offset: int = 0,
                    progress=None, chunk: int = CHUNK, drop_cache: bool = True) -> LoadStats:
    """Read file bytes [offset, offset+nbytes) into dest_buffer[dest_offset:...].

    progress: optional callable(done_bytes, total_bytes) called after each chunk.
    Raises DsdError if the file is shorter than asked or the destination too small.
    """
    mv = _dest_view(dest_buffer)
    if offset < 0 or nbytes < 0 or dest_offset < 0:
        raise ValueError("offset, nbytes and dest_offset must be >= 0")
    if dest_offset + nbytes > len(mv):
        raise ValueError(f"destination has {len(mv)} bytes, cannot hold {nbytes} at "
                         f"offset {dest_offset}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DsdError(f"cannot open {path}: {e.strerror}; check the model path") from e
    t0 = time.perf_counter()
    done = chunks = 0
    try:
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise DsdError(f"{path} has {size} bytes, cannot read {nbytes} at offset {offset}: "
                           f"the file is truncated or not the expected model")
        # tell the kernel we read sequentially: bigger readahead windows
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
        while done < nbytes:
            n = min(chunk, nbytes - done)
            got = os.preadv(fd, [mv[dest_offset + done: dest_offset + done + n]], offset + done)
            if got <= 0:
                raise DsdError(f"{path}: unexpected end of file at byte {offset + done}")
            if drop_cache:
                # DONTNEED only drops page-cache folios (up to 2 MiB on recent kernels) that
                # lie wholly inside the range, so the folio straddling the previous chunk
                # boundary is dropped now, with a back margin of FOLIO_MARGIN.
                lo = max(offset, offset + done - FOLIO_MARGIN)
                os.posix_fadvise(fd, lo, offset + done + got - lo, os.POSIX_FADV_DONTNEED)
            done += got
            chunks += 1
            if progress is not None:
                progress(done, nbytes)
    finally:
        os.close(fd)
        mv.release()
    return LoadStats(nbytes, time.perf_counter() - t0, chunks, drop_cache)
