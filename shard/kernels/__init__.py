"""numba compute kernels on raw GGUF block bytes: dequantize, matvec (decode), matmul (prefill).

    from dsd.shard.kernels import QUANT_TYPES, quant_type, dequantize, matvec, matmul, row_bytes
"""
import os as _os


def drop_stale_numba_cache(src_dir: str, cache_dir: str) -> bool:
    """numba keys a function's on-disk cache on its own source file only, but the drivers here
    inline row kernels that other files of this package emit as LLVM IR (intrinsics): after an
    edit or an upgrade of one of those, a driver would load its old machine code.  So the cache
    (cache_dir) is tied to a hash of every .py file of src_dir and its .nbi / .nbc files are
    deleted when that changes -> True if it deleted (silently nothing where not writable)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(_os.listdir(src_dir)):
        if f.endswith(".py"):
            with open(_os.path.join(src_dir, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    stamp, path = h.hexdigest(), _os.path.join(cache_dir, "dsd-kernels.stamp")
    try:
        with open(path) as fh:
            if fh.read().strip() == stamp:
                return False
    except OSError:
        pass
    try:
        for f in _os.listdir(cache_dir) if _os.path.isdir(cache_dir) else []:
            if f.endswith((".nbi", ".nbc")):
                try:
                    _os.unlink(_os.path.join(cache_dir, f))
                except FileNotFoundError:
                    pass
        _os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{_os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(stamp + "\n")
        _os.replace(tmp, path)
    except OSError:
        return False
    return True


def _numba_cache_dir(src_dir: str) -> str | None:
    """Where numba caches this package: its __pycache__, or its place under NUMBA_CACHE_DIR."""
    if not _os.environ.get("NUMBA_CACHE_DIR"):
        return _os.path.join(src_dir, "__pycache__")
    try:   # numba's own locator for a file of this directory
        from numba.core.caching import UserProvidedCacheLocator

        return UserProvidedCacheLocator(_numba_cache_dir, _os.path.join(src_dir, "registry.py"))._cache_path
    except Exception:
        return None


_here = _os.path.dirname(_os.path.abspath(__file__))
if (_cache := _numba_cache_dir(_here)) is not None:
    drop_stale_numba_cache(_here, _cache)

from . import registry  # noqa: F401,E402
from .registry import (FUSED_MAX_T, QUANT_TYPES, batch_invariant, exact_activations, QuantType, dequantize, matmul, matvec, matvec_gather,  # noqa: F401,E402
                       quant_type, row_bytes, split_unit, prepare_matvec, stack_view, warm_up, matvec_offsets, has_simd_rows,
                       experts_gate_up, experts_down_sum)


def batch_invariant_mode() -> bool:
    """True while products are batch-invariant (DSD_DETERMINISTIC=1 or batch_invariant()):
    model code then also runs attention and routed experts the way one decode step does."""
    return registry.BATCH_INVARIANT
