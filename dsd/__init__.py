"""dsd: NUMA-sharded inference daemon for Mixture-of-Experts models on CPU servers."""
import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS threads spin ~2^28 cycles after each BLAS call (attention, float prompt
# products); on a 2-core machine that spin stalls the barrier of the next numba parallel kernel
# and made the kernels' contention back-off run most prompt products on one thread.  2^4 cycles:
# they sleep at once (DeepSeek-shaped 64-token prompt 1.69 -> 0.90 s, SmolLM2 512-token prompt
# 396 -> 520 tok/s; BENCHMARKS.md, session 3).  Read when OpenBLAS loads: effective when dsd is
# imported before numpy (the dsd command, daemon workers); an explicit setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
