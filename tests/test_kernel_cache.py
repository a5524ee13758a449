"""kernels.drop_stale_numba_cache: numba checks only a cached function's own file, so the package
ties its cache to a hash of all its source files; an edit anywhere drops the compiled code."""
import os
import subprocess
import sys

from dsd.shard import kernels


def _files(d):
    return sorted(f for f in os.listdir(d) if f.endswith((".nbi", ".nbc")))


def test_cache_kept_while_sources_unchanged_dropped_after_an_edit(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    (src / "rows.py").write_text("A = 1\n")
    (src / "drivers.py").write_text("B = 2\n")
    (cache / "drivers.mv-10.py311.nbi").write_bytes(b"x")
    (cache / "drivers.mv-10.py311.1.nbc").write_bytes(b"y")
    (cache / "other.txt").write_text("kept")
    # no stamp yet: provenance unknown, so the compiled files go
    assert kernels.drop_stale_numba_cache(str(src), str(cache)) is True
    assert _files(cache) == [] and (cache / "other.txt").exists()
    (cache / "drivers.mv-10.py311.nbi").write_bytes(b"x")        # numba compiles again
    assert kernels.drop_stale_numba_cache(str(src), str(cache)) is False
    assert _files(cache) == ["drivers.mv-10.py311.nbi"]
    (src / "rows.py").write_text("A = 3\n")                       # a row kernel's file changes
    assert kernels.drop_stale_numba_cache(str(src), str(cache)) is True
    assert _files(cache) == []
    assert kernels.drop_stale_numba_cache(str(src), str(cache)) is False


def test_package_import_stamps_numba_cache_dir(tmp_path):
    """Under NUMBA_CACHE_DIR the stamp goes where numba puts this package's cache, and a compiled
    kernel survives the next process's import."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    code = ("import numpy as np; from gguf import GGMLQuantizationType as G; import dsd.shard.kernels as K; "
            "K.matvec(np.zeros((4, 34), np.uint8), int(G.Q8_0), np.zeros(32, np.float32))")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    stamps = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == "dsd-kernels.stamp"]
    assert len(stamps) == 1
    d = os.path.dirname(stamps[0])
    before = _files(d)
    assert before, "the matvec above was cached next to the stamp"
    subprocess.run([sys.executable, "-c", "import dsd.shard.kernels"], env=env, check=True)
    assert _files(d) == before
