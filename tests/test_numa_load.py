"""load_file_range: exact bytes into node-local buffers, page cache dropped afterwards."""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

from dsd.errors import DsdError
from dsd.numa import allocate, load_file_range

MIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(path: str, offset: int, nbytes: int) -> int:
    """Pages of [offset, offset+nbytes) of the file in the page cache (mincore)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    length = offset + nbytes - start
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=start)
        try:
            arr = np.frombuffer(m, dtype=np.uint8)  # to get the mapping's address
            vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
            r = _libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(length), vec)
            assert r == 0, os.strerror(ctypes.get_errno())
            del arr
            return sum(v & 1 for v in vec)
        finally:
            m.close()


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=40 * MIB + 4321, dtype=np.uint8)
    p = tmp_path / "weights.bin"
    data.tofile(p)
    with open(p, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped from the cache
    return str(p), data


def test_exact_bytes_and_cache_dropped(data_file):
    path, data = data_file
    off, n = 3 * MIB + 17, 30 * MIB + 5
    with open(path, "rb") as f:
        f.read()  # warm the page cache
    assert cached_pages(path, off, n) > 0
    seen = []
    with allocate(n + 100, 0, pages="thp") as buf:
        st = load_file_range(path, off, n, buf, dest_offset=100, chunk=8 * MIB,
                             progress=lambda d, t: seen.append((d, t)))
        a = buf.array()
        assert np.array_equal(a[100:100 + n], data[off:off + n])
        assert not a[:100].any()  # bytes before dest_offset untouched (zero-filled pages)
        del a
    assert st.nbytes == n and st.chunks == 4 and st.gbps > 0 and "GB/s" in str(st)
    assert seen[-1] == (n, n) and len(seen) == 4
    # only the page-cache folios (<= 2 MiB each) straddling the range's two ends may stay
    assert cached_pages(path, off, n) <= 2 * (2 * MIB) // mmap.PAGESIZE


def test_keeps_cache_when_asked(data_file):
    path, data = data_file
    dest = bytearray(MIB)
    load_file_range(path, 0, MIB, dest, drop_cache=False)
    assert bytes(dest) == data[:MIB].tobytes()
    assert cached_pages(path, 0, MIB) == MIB // mmap.PAGESIZE


def test_into_numpy_float_array(data_file):
    path, data = data_file
    dest = np.zeros(1024, dtype=np.float32)
    load_file_range(path, 8, 4096, dest)
    assert dest.tobytes() == data[8:8 + 4096].tobytes()


def test_errors(data_file, tmp_path):
    path, data = data_file
    with pytest.raises(DsdError, match="truncated"):
        load_file_range(path, len(data) - 10, 20, bytearray(20))
    with pytest.raises(ValueError, match="cannot hold"):
        load_file_range(path, 0, 100, bytearray(50))
    with pytest.raises(DsdError, match="cannot open"):
        load_file_range(str(tmp_path / "missing"), 0, 1, bytearray(1))
    with pytest.raises(ValueError, match="read-only"):
        load_file_range(path, 0, 1, bytes(1))


def test_load_bench_runs_and_leaves_no_cache():
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(here, "bench", "load_bench.py"),
                        "--size-mib", "48", "--repeat", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    run = rep["runs"][0]
    assert rep["bytes"] == 48 * MIB and run["gbps"] > 0 and run["cat_gbps"] > 0
    assert run["cached_before"] > 0.9 and run["cached_after"] < 0.1
    assert run["hwm"] >= 48 * MIB  # the pre-faulted destination is resident
