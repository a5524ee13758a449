"""Node-local allocation on this machine's real node 0, with hugepages reserved by the tests.

Every reservation is restored by the `pools` fixture's finalizer; at most 1 GiB + ~40 MiB of
hugepages are reserved at a time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dsd.errors import HugePagePoolError, NumaError
from dsd.numa import allocate, live_bytes, process_placement, read_topology
from dsd.numa.topology import PAGE_1G, PAGE_2M, node_pool_path

MIB = 1 << 20


def _path(kind: str) -> str:
    return node_pool_path(0, kind, "/", read_topology().numa_kernel)


def _read(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _free(kind: str) -> int:
    return read_topology().node(0).pool(kind).free


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


@pytest.fixture
def pools():
    """reserve(kind, n): make n more pages of `kind` free on node 0; returns free count.
    Restores every nr_hugepages value it touched, and checks nothing was left mapped."""
    saved = {k: _read(_path(k)) for k in ("2m", "1g")}
    before = live_bytes()

    def reserve(kind: str, n: int) -> int:
        p = read_topology().node(0).pool(kind)
        target = (p.total - p.free) + n
        for attempt in range(3):
            if kind == "1g":
                _write("/proc/sys/vm/compact_memory", 1)
            try:
                _write(_path(kind), target)
            except OSError:
                pass
            if _free(kind) >= n:
                break
            if attempt == 1:  # page cache can pin the last contiguous gigabytes
                _write("/proc/sys/vm/drop_caches", 1)
        got = _free(kind)
        assert got >= n, f"kernel gave only {got} of {n} {kind} pages on node 0"
        return got

    try:
        yield reserve
    finally:
        assert live_bytes() == before, "a NodeBuffer was left mapped"
        for k, v in saved.items():
            _write(_path(k), v)
        assert {k: _read(_path(k)) for k in saved} == saved


def _fill_and_check(buf, value=7):
    a = buf.array(np.uint8)
    a[:: 4096] = value  # touch each 4 KiB page (already faulted in: only checks access)
    a[-1] = value
    assert a[0] == value and a[-1] == value


def test_4k_pages_on_node0_proven():
    with allocate(5 * MIB + 123, 0, pages="4k") as b:
        assert b.page_kind == "4k" and b.nbytes == 5 * MIB + 123 and b.node == 0
        assert b.mapped_bytes == 5 * MIB + 4096
        pl = b.placement()  # pre-faulted: every page present before any touch
        assert pl.all_on(0, "4k"), pl.summary()
        _fill_and_check(b)
    assert b.closed


def test_thp_pages_on_node0():
    with allocate(16 * MIB, 0, pages="thp") as b:
        pl = b.placement()
        assert pl.fraction_on(0) == 1.0 and pl.not_present == 0, pl.summary()
        if read_topology().thp != "never":
            assert pl.bytes_by_page.get("thp", 0) >= 8 * MIB, pl.summary()


def test_2m_pages_on_node0_and_pool_returned(pools):
    free0 = pools("2m", 8)
    b = allocate(10 * MIB + 1, 0, pages="2m")  # rounds up to 6 pages
    assert b.mapped_bytes == 12 * MIB and b.page_kind == "2m"
    assert _free("2m") == free0 - 6
    pl = b.placement()
    assert pl.all_on(0, "2m"), pl.summary()
    assert pl.bytes_by_node == {0: 12 * MIB} and pl.bytes_by_page == {"2m": 12 * MIB}
    x = b.array(np.float32, (1024, 256), offset=4 * MIB)
    x[:] = np.arange(256, dtype=np.float32)
    assert x.sum() == 1024 * sum(range(256))
    del x
    assert b.free() is True
    assert _free("2m") == free0


def test_unaligned_size_is_rounded_so_it_can_be_unmapped(pools):
    free0 = pools("2m", 2)
    for _ in range(3):
        b = allocate(3 * MIB, 0, pages="2m")  # a 3 MiB hugetlb mapping could not be unmapped
        assert b.mapped_bytes == 4 * MIB
        b.free()
        assert _free("2m") == free0


def test_1g_page_on_node0(pools):
    pools("1g", 1)
    with allocate(PAGE_1G, 0, pages="1g") as b:
        assert b.page_kind == "1g" and b.address % PAGE_1G == 0
        pl = b.placement()
        assert pl.all_on(0, "1g"), pl.summary()
        a = b.array(np.uint64)
        a[::4096] = 3
        assert int(a[::4096].sum()) == 3 * len(a[::4096])
        del a


def test_auto_falls_back_1g_then_2m_then_thp(pools):
    pools("1g", 1)
    assert pools("2m", 4) == 4, "another user's free 2 MiB pages would change the split"
    want = PAGE_1G + 20 * MIB
    with allocate(want, 0, pages="auto") as b:
        got = b.bytes_by_kind()
        tail = "4k" if read_topology().thp == "never" else "thp"
        assert got == {"1g": PAGE_1G, "2m": 4 * PAGE_2M, tail: 12 * MIB}, b.report()
        assert b.page_kind == "mixed" and "1 GiB in 1g pages" in b.report()
        assert [s.offset for s in b.segments] == [0, PAGE_1G, PAGE_1G + 8 * MIB]
        pl = b.placement()
        assert pl.fraction_on(0) == 1.0 and pl.not_present == 0, pl.summary()
        assert pl.bytes_by_page["1g"] == PAGE_1G and pl.bytes_by_page["2m"] == 8 * MIB
        assert pl.bytes_by_page.get("thp", 0) + pl.bytes_by_page.get("4k", 0) == 12 * MIB
        # one contiguous range across segment boundaries
        a = b.array(np.uint8)
        a[PAGE_1G - 1: PAGE_1G + 1] = 5
        a[PAGE_1G + 8 * MIB - 1: PAGE_1G + 8 * MIB + 1] = 6
        assert list(a[PAGE_1G - 1: PAGE_1G + 1]) == [5, 5]
        del a
    assert _free("1g") >= 1 and _free("2m") >= 4


def test_auto_without_pools_uses_thp_or_4k():
    # pools may hold other users' pages; auto only takes what is free, here it has no 1g need
    with allocate(6 * MIB, 0) as b:
        assert set(b.bytes_by_kind()) <= {"2m", "thp", "4k"}
        assert b.placement().fraction_on(0) == 1.0


def test_strict_2m_pool_too_small_is_a_clean_error(pools):
    free0 = pools("2m", 2)
    with pytest.raises(HugePagePoolError) as e:
        allocate(free0 * PAGE_2M + 10 * MIB, 0, pages="2m")
    msg = str(e.value)
    assert "node 0" in msg and "echo " in msg and "hugepages-2048kB" in msg
    assert _free("2m") == free0  # nothing half-allocated is kept


def test_strict_1g_without_pool_is_a_clean_error(pools):
    free1 = _free("1g")
    with pytest.raises(HugePagePoolError) as e:
        allocate((free1 + 1) * PAGE_1G, 0, pages="1g")
    assert "1g" in str(e.value) and "hugepages-1048576kB" in str(e.value)


@pytest.mark.parametrize("node", [1, 7, 64, -1, "0", True, None])
def test_bad_node_rejected_before_any_syscall(node):
    with pytest.raises(NumaError) as e:
        allocate(MIB, node, pages="4k")
    assert "node" in str(e.value)


@pytest.mark.parametrize("kw", [{"nbytes": 0}, {"nbytes": -5}, {"nbytes": 1.5},
                                {"pages": "64k"}])
def test_bad_size_or_page_kind(kw):
    args = {"nbytes": MIB, "node": 0, "pages": "4k"} | kw
    with pytest.raises(NumaError):
        allocate(**args)


def test_free_with_live_view_is_deferred_not_a_crash():
    b = allocate(2 * MIB, 0, pages="4k")
    a = b.array(np.uint32)
    a[:] = 9
    assert b.free() is False  # a numpy view still uses it
    assert b.closed and live_bytes() >= 2 * MIB
    assert int(a[-1]) == 9  # still valid memory
    with pytest.raises(ValueError):
        b.array()
    del a  # last view gone -> unmapped
    assert live_bytes() == 0


def test_garbage_collected_buffer_is_unmapped():
    b = allocate(2 * MIB, 0, pages="4k")
    mv = b.memoryview()
    assert len(mv) == 2 * MIB and not mv.readonly
    del b
    assert live_bytes() == 2 * MIB  # the memoryview keeps it alive
    mv.release()
    del mv
    assert live_bytes() == 0


def test_array_bounds_checked():
    with allocate(MIB, 0, pages="4k") as b:
        with pytest.raises(ValueError):
            b.array(np.float32, (1024, 257))
        assert b.array(np.float32, (1024, 256)).shape == (1024, 256)


def test_placement_of_another_process(pools):
    pools("2m", 4)
    code = textwrap.dedent("""
        import sys
        from dsd.numa import allocate
        b = allocate(8 << 20, 0, pages="2m")
        print(b.address, flush=True)
        sys.stdin.readline()
        b.free()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        addr = int(p.stdout.readline())
        pl = process_placement(p.pid, addr, 8 << 20)
        assert pl.total == 8 << 20 and pl.bytes_by_node == {0: 8 << 20}
        assert pl.bytes_by_page == {"2m": 8 << 20}
        whole = process_placement(p.pid)  # whole process: interpreter pages too
        assert whole.bytes_by_page.get("2m") == 8 << 20 and whole.fraction_on(0) == 1.0
        assert whole.total > 8 << 20
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(timeout=30)
    assert p.returncode == 0


def test_numa_maps_view_agrees_with_move_pages(pools):
    free2 = pools("2m", 4)
    with allocate(8 * MIB + 6 * MIB, 0, pages="auto") as b:
        mp = b.placement()
        nm = process_placement("self", b.address, b.mapped_bytes)
        assert nm.total == mp.total == b.mapped_bytes
        assert nm.bytes_by_node == mp.bytes_by_node == {0: b.mapped_bytes}
        assert nm.bytes_by_page["2m"] == mp.bytes_by_page["2m"] == min(free2, 7) * PAGE_2M


def test_process_exit_returns_hugepages_without_free(pools):
    free0 = pools("2m", 4)
    code = "from dsd.numa import allocate; b = allocate(8 << 20, 0, pages='2m'); print(b.page_kind)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "2m", r.stderr
    assert _free("2m") == free0


@pytest.mark.parametrize("pages", ["4k", "thp", "auto"])
def test_allocate_reports_prefault_progress(monkeypatch, pages):
    """Pre-faulting goes in POPULATE_STEP pieces with progress after each, ending at the
    mapping's length (a 671B model's pages take minutes to fault: the bar must move)."""
    from dsd.numa import alloc

    monkeypatch.setattr(alloc, "POPULATE_STEP", 4 * PAGE_2M)
    calls = []
    with allocate(18 * PAGE_2M + 5, 0, pages=pages, progress=lambda d, t: calls.append((d, t))) as b:
        assert np.asarray(b.array("uint8")).size >= 18 * PAGE_2M
    done = [d for d, _ in calls]
    assert len(calls) >= 5 and done == sorted(done)
    assert calls[-1][0] == calls[-1][1] >= 18 * PAGE_2M + 5
