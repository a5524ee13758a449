"""Time the multi-token (T = 8 / 16) products of real K-quant matrices: the output head of the
synthetic model (Q4_K) and a Q6_K matrix of a `dsd synth --type Q6_K` model; min and median of
15 calls.  Used for the A/B of kernel changes in BENCHMARKS.md (compare two commits in one run).

    python bench/multi_token.py [--threads 2] [--q4k /tmp/dsd-bench-synth-L4.gguf] [--q6k /tmp/ds4-q6k.gguf]
"""
from __future__ import annotations

import argparse
import sys
import time

import dsd  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see dsd/__init__.py)
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q4k", default="/tmp/dsd-bench-synth-L4.gguf")
    ap.add_argument("--q6k", default="/tmp/ds4-q6k.gguf")
    args = ap.parse_args()
    from dsd.shard import kernels
    from dsd.shard.engine import set_threads
    from dsd.shard.gguf_file import open_gguf

    set_threads(args.threads)
    rng = np.random.default_rng(0)
    for path, ggml_type, rows in ((args.q4k, 12, 24576), (args.q6k, 14, 8192)):
        g = open_gguf(path)
        names = sorted(g.tensors, key=lambda n: n != "output.weight")  # the head first
        name = next(n for n in names if g.tensors[n].ggml_type == ggml_type and len(g.tensors[n].shape) == 2
                    and g.tensors[n].shape[0] >= rows)
        t = g.tensors[name]
        raw = np.array(t.raw()[:rows])
        for T in (8, 16):
            X = rng.standard_normal((T, t.shape[-1])).astype(np.float32)
            for _ in range(3):
                kernels.matmul(raw, t.ggml_type, X)
            ts = []
            for _ in range(15):
                t0 = time.perf_counter()
                kernels.matmul(raw, t.ggml_type, X)
                ts.append(time.perf_counter() - t0)
            print(f"{name} type {t.ggml_type} {rows} x {t.shape[-1]} T={T}: {min(ts) * 1e3:.2f} ms min, "
                  f"{np.median(ts) * 1e3:.2f} ms median", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
