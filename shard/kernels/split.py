"""How the multi-token kernels cut their work into parallel items (balance on 1..64 threads).

numba's static prange schedule gives each thread a contiguous range of items whose lengths
differ by at most one (measured: tests/test_work_split.py), so a region's efficiency is
(items / threads) / ceil(items / threads): fine when every thread gets many items, poor when
the item count sits just above a multiple of the thread count (64 items of 32 rows on 63
threads: two items for one thread, 51%).  The prompt kernels therefore split 2-D -- row blocks
times 16-token groups (each item: its rows' bytes in L2 across the group, the group's x in
L1) -- and shrink the row block until there are ITEMS_PER_THREAD items per thread (>= 8/9 of
the ideal) or a block is one row.
"""
from __future__ import annotations

ITEMS_PER_THREAD = 8
MAX_ROWS_PER_ITEM = 32  # the prompt kernels' row block when the work is large


def rows_per_item(nrows: int, groups: int, threads: int, max_rows: int = MAX_ROWS_PER_ITEM) -> int:
    """Rows per work item so that ceil(nrows / rows) * groups >= ITEMS_PER_THREAD * threads
    where that is possible (at least 1 row, at most max_rows)."""
    want = ITEMS_PER_THREAD * max(1, threads)
    rows = max_rows
    while rows > 1 and -(-nrows // rows) * groups < want:
        rows //= 2
    return max(1, rows)


def efficiency(items: int, threads: int) -> float:
    """Mean over max items per thread under a static schedule of `items` equal items."""
    if items <= 0:
        return 1.0
    return (items / threads) / -(-items // threads)
