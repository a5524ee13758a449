"""Kernel throughput: matvec GB/s (raw weight bytes / time) per type and shape, matmul GFLOP/s.

    python bench/kernels_bench.py [--threads 2] [--reps 50]

Timings are the best of --reps calls (the dev machine is shared and noisy; best-of approximates
an idle machine). "hot" = same matrix every call (fits in L2/L3), "cold" = rotate over enough
copies to exceed the 32 MiB L3, which is what decode sees on a real model.
"""
import argparse
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.shard.kernels import QUANT_TYPES, matmul, matvec, row_bytes

L3 = 32 << 20


def make_raw(gt, rows, cols, rng):
    rb = row_bytes(int(gt), cols)
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    if gt in (G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0):
        return np.ascontiguousarray(gq.quantize(rng.standard_normal((rows, cols)).astype(np.float32), gt)
                                    ).view(np.uint8).reshape(rows, rb)
    if gt in (G.F32, G.F16, G.BF16):
        v = rng.standard_normal((rows, cols)).astype(np.float32)
        if gt == G.F32:
            return v.view(np.uint8).reshape(rows, rb)
        if gt == G.F16:
            return v.astype(np.float16).view(np.uint8).reshape(rows, rb)
        return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, rb)
    return raw  # K-quants: random bytes are as fast as real ones (scales may be inf/nan: ignored)


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_matvec(gt, rows, cols, reps, rng):
    raw = make_raw(gt, rows, cols, rng)
    n = max(1, min(64, (2 * L3) // raw.nbytes + 1))
    mats = [raw] + [raw.copy() for _ in range(n - 1)]
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    matvec(raw, int(gt), x, out)
    hot = best(lambda: matvec(raw, int(gt), x, out), reps)
    it = iter(range(1 << 62))
    cold = best(lambda: matvec(mats[next(it) % n], int(gt), x, out), reps)
    return raw.nbytes, hot, cold


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--types", default="Q4_1,Q8_0,Q4_K,Q6_K,Q5_0,Q4_0,Q5_1,Q5_K,Q2_K,Q3_K,F16,BF16,F32")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    types = [G[t] for t in a.types.split(",")]
    print(f"numba threads={numba.get_num_threads()} par_min_bytes={__import__('dsd.shard.kernels.registry', fromlist=['x']).PAR_MIN_BYTES}")
    print("matvec (GB/s of raw weights, best of reps; hot = cache-resident, cold = streaming)")
    shapes = {"2048x2048": (2048, 2048)}
    for gt in types:
        for name, (r, c) in shapes.items():
            nbytes, hot, cold = bench_matvec(gt, r, c, a.reps, rng)
            print(f"  {gt.name:5s} {name:10s} {nbytes/1e6:7.2f} MB  hot {nbytes/hot/1e9:6.1f} GB/s "
                  f"{hot*1e6:8.1f} us   cold {nbytes/cold/1e9:6.1f} GB/s {cold*1e6:8.1f} us")
    print("SmolLM2-135M shapes")
    for gt, (r, c) in [(G.Q4_1, (576, 576)), (G.Q4_1, (192, 576)), (G.Q4_1, (1536, 576)),
                       (G.Q4_1, (576, 1536)), (G.Q8_0, (49152, 576))]:
        nbytes, hot, cold = bench_matvec(gt, r, c, a.reps, rng)
        print(f"  {gt.name:5s} {r}x{c:<6d} {nbytes/1e6:7.2f} MB  hot {nbytes/hot/1e9:6.1f} GB/s "
              f"{hot*1e6:8.1f} us   cold {nbytes/cold/1e9:6.1f} GB/s {cold*1e6:8.1f} us")
    print("DeepSeek-shaped")
    for gt, (r, c) in [(G.Q4_K, (1408, 2048)), (G.Q4_K, (2048, 1408 // 256 * 256 or 256)),
                       (G.Q5_0, (2048, 1408)), (G.Q8_0, (2048, 1408)), (G.Q6_K, (2048, 2048))]:
        nbytes, hot, cold = bench_matvec(gt, r, c, a.reps, rng)
        print(f"  {gt.name:5s} {r}x{c:<6d} {nbytes/1e6:7.2f} MB  hot {nbytes/hot/1e9:6.1f} GB/s "
              f"{hot*1e6:8.1f} us   cold {nbytes/cold/1e9:6.1f} GB/s {cold*1e6:8.1f} us")
    # Python-side overhead: a 1-row matrix
    raw = make_raw(G.Q4_1, 1, 32, rng)
    x = np.ones(32, np.float32)
    out = np.empty(1, np.float32)
    matvec(raw, int(G.Q4_1), x, out)
    print(f"per-call overhead (1x32 Q4_1 matvec): {best(lambda: matvec(raw, int(G.Q4_1), x, out), 2000)*1e6:.1f} us")
    print("matmul T=512 (GFLOP/s = 2*T*rows*cols / time); numpy sgemm on float32 W for comparison")
    T = 512
    for gt, (r, c) in [(G.Q4_1, (1536, 576)), (G.Q4_1, (2048, 2048)), (G.Q8_0, (2048, 2048)),
                       (G.Q4_K, (2048, 2048)), (G.Q6_K, (2048, 2048))]:
        raw = make_raw(gt, r, c, rng)
        X = rng.standard_normal((T, c)).astype(np.float32)
        out = np.empty((T, r), np.float32)
        matmul(raw, int(gt), X, out)
        dt = best(lambda: matmul(raw, int(gt), X, out), max(3, a.reps // 10))
        W = rng.standard_normal((r, c)).astype(np.float32)
        dtb = best(lambda: np.matmul(X, W.T, out=out), max(3, a.reps // 10))
        fl = 2 * T * r * c
        print(f"  {gt.name:5s} {r}x{c:<6d} {fl/dt/1e9:7.1f} GFLOP/s ({dt*1e3:6.2f} ms)   "
              f"sgemm {fl/dtb/1e9:7.1f} GFLOP/s ({dtb*1e3:6.2f} ms)")


if __name__ == "__main__":
    main()
