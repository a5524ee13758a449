"""Product throughput per weight type, beside Q4_K's: GB/s of the type's own bytes for matvec
(T = 1) and matmul at T = 8, 64, 512 on one 2048 x 2048 matrix of random blocks (sane scales).

    python bench/types_bench.py [--threads 2] [--reps 5] [--types IQ2_XXS,IQ4_XS,...]

Rounds alternate over the types (each timing loops calls for >= 20 ms) and the median of --reps
is kept; the last column block is
each figure over Q4_K's in the same run (compare those, not absolute GB/s, on a shared host).
"""
import argparse
import time

import dsd  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see dsd/__init__.py)
import numba
import numpy as np
from gguf import GGMLQuantizationType as G

from dsd.shard.kernels import matmul, matvec, registry
from dsd.shard.synth import random_blocks

LOW_BIT = "IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,IQ4_NL,IQ4_XS,MXFP4,TQ1_0,TQ2_0"
TOKENS = (1, 8, 64, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--types", default="Q4_K," + LOW_BIT)
    ap.add_argument("--size", type=int, default=2048, help="rows = columns of the matrix")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    # kernel throughput, not the contention back-off: a stalled region (the first after another
    # type's sgemm, whose OpenBLAS threads still spin) must not send the next 50 ms serial
    registry.PAR_BACKOFF_S = 0.0
    names = a.types.split(",")
    if "Q4_K" not in names:
        names.insert(0, "Q4_K")
    rng = np.random.default_rng(0)
    n = a.size
    mats = {name: random_blocks(G[name], (n, n), rng, std=0.05) for name in names}
    xs = {T: rng.standard_normal((T, n)).astype(np.float32) for T in TOKENS}
    times = {(name, T): [] for name in names for T in TOKENS}

    def call(name, T):
        raw, gt = mats[name], int(G[name])
        return matvec(raw, gt, xs[1][0]) if T == 1 else matmul(raw, gt, xs[T])

    loops = {}
    for name in names:  # compile / load every specialisation, then size each timing to >= 20 ms
        for T in TOKENS:
            call(name, T)
            t0 = time.perf_counter()
            call(name, T)
            loops[(name, T)] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(a.reps):
        for T in TOKENS:
            for name in names:
                k = loops[(name, T)]
                call(name, T)
                t0 = time.perf_counter()
                for _ in range(k):
                    call(name, T)
                times[(name, T)].append((time.perf_counter() - t0) / k)
    gbs = {k: mats[k[0]].nbytes / np.median(v) / 1e9 for k, v in times.items()}
    head = " | ".join(f"T={T}" for T in TOKENS)
    print(f"| type | bits/weight | {head} | {' | '.join(f'/Q4_K T={T}' for T in TOKENS)} |")
    print("|---" * (2 + 2 * len(TOKENS)) + "|")
    for name in names:
        bpw = 8 * mats[name].nbytes / (n * n)
        cells = " | ".join(f"{gbs[(name, T)]:.2f}" for T in TOKENS)
        rel = " | ".join(f"{gbs[(name, T)] / gbs[('Q4_K', T)]:.2f}" for T in TOKENS)
        print(f"| {name} | {bpw:.2f} | {cells} | {rel} |")
    print(f"\nGB/s of each type's bytes; {a.threads} threads; {n} x {n}; median of {a.reps}.")


if __name__ == "__main__":
    main()
