"""Kernel throughput: matvec GB/s (raw weight bytes / time) per type and shape, fused small-batch
matmul vs matvec, prefill matmul GFLOP/s vs numpy sgemm, parallel-region overhead.

    python bench/kernels_bench.py [--threads 1] [--reps 50] [--sections mv,smol,fused,prefill,overhead]

Timings are the best of --reps calls (the dev machine is shared and noisy; best-of approximates
an idle machine). "hot" = same matrix every call (cache-resident), "cold" = rotate over enough
copies to exceed the 32 MiB L3, which is what decode sees on a real model.
To see AVX2-only code on an AVX-512 host, run with NUMBA_CPU_NAME=haswell and
NUMBA_CPU_FEATURES set to an AVX2 feature list (see --help) and a separate NUMBA_CACHE_DIR.
"""
import argparse
import time

import numba
import dsd  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see dsd/__init__.py)
import numpy as np
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.shard.kernels import matmul, matvec, row_bytes
from dsd.shard.kernels import registry

L3 = 32 << 20
AVX2_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,"
                 "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512bw,"
                 "-avx512vl,-avx512dq,-avx512cd")
DEEPSEEK = [(G.Q4_K, (2048, 2048)), (G.Q4_K, (1408, 2048)), (G.Q5_0, (2048, 1408)),
            (G.Q8_0, (2048, 1408)), (G.Q6_K, (2048, 2048)), (G.Q5_K, (2048, 2048)),
            (G.Q4_1, (2048, 2048)), (G.Q4_0, (2048, 2048)), (G.Q5_1, (2048, 2048)),
            (G.Q8_0, (2048, 2048)), (G.Q2_K, (2048, 2048)), (G.Q3_K, (2048, 2048)),
            (G.F16, (2048, 2048)), (G.BF16, (2048, 2048)), (G.F32, (2048, 2048))]
SMOL = [(G.Q4_1, (576, 576)), (G.Q4_1, (192, 576)), (G.Q4_1, (1536, 576)),
        (G.Q4_1, (576, 1536)), (G.Q8_0, (49152, 576))]


def make_raw(gt, rows, cols, rng):
    rb = row_bytes(int(gt), cols)
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
    # K-quants: random bytes run at the same speed as real ones (scales may be inf/nan: ignored)
    return rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_matvec(gt, rows, cols, reps, rng, fn=matvec):
    raw = make_raw(gt, rows, cols, rng)
    n = max(1, min(64, (2 * L3) // raw.nbytes + 1))
    mats = [raw] + [raw.copy() for _ in range(n - 1)]
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    fn(raw, int(gt), x, out)
    hot = best(lambda: fn(raw, int(gt), x, out), reps)
    it = iter(range(1 << 62))
    cold = best(lambda: fn(mats[next(it) % n], int(gt), x, out), reps)
    return raw.nbytes, hot, cold


def line(gt, r, c, nbytes, hot, cold):
    return (f"  {gt.name:5s} {r:5d}x{c:<5d} {nbytes/1e6:7.2f} MB  hot {nbytes/hot/1e9:6.1f} GB/s "
            f"{hot*1e6:8.1f} us   cold {nbytes/cold/1e9:6.1f} GB/s {cold*1e6:8.1f} us")


def sec_mv(a, rng):
    print("matvec, DeepSeek-shaped and all types (GB/s of raw weights)")
    for gt, (r, c) in DEEPSEEK:
        if gt.name in a.types.split(","):
            print(line(gt, r, c, *bench_matvec(gt, r, c, a.reps, rng)), flush=True)


def sec_smol(a, rng):
    print("matvec, SmolLM2-135M shapes")
    for gt, (r, c) in SMOL:
        print(line(gt, r, c, *bench_matvec(gt, r, c, a.reps, rng)), flush=True)


def sec_fused(a, rng):
    print("small-batch matmul (fused): time(T) / time(matvec), hot weights")
    for gt, (r, c) in [(G.Q4_K, (2048, 2048)), (G.Q4_K, (1408, 2048)), (G.Q8_0, (2048, 1408)),
                       (G.Q5_0, (2048, 1408)), (G.Q6_K, (2048, 2048)), (G.Q4_1, (1536, 576))]:
        raw = make_raw(gt, r, c, rng)
        x = rng.standard_normal(c).astype(np.float32)
        o1 = np.empty(r, np.float32)
        matvec(raw, int(gt), x, o1)
        t1 = best(lambda: matvec(raw, int(gt), x, o1), a.reps)
        parts = []
        for T in (2, 4, 8, 16):
            X = rng.standard_normal((T, c)).astype(np.float32)
            o = np.empty((T, r), np.float32)
            matmul(raw, int(gt), X, o)
            tT = best(lambda: matmul(raw, int(gt), X, o), a.reps)
            parts.append(f"T={T}: {tT/t1:4.2f}x")
        print(f"  {gt.name:5s} {r:5d}x{c:<5d} matvec {t1*1e6:7.1f} us  " + "  ".join(parts), flush=True)


def sec_prefill(a, rng):
    print("matmul T=512 (GFLOP/s = 2*T*rows*cols / time) vs numpy sgemm on float32 W")
    T = 512
    for gt, (r, c) in [(G.Q4_1, (1536, 576)), (G.Q4_1, (2048, 2048)), (G.Q8_0, (2048, 2048)),
                       (G.Q4_K, (2048, 2048)), (G.Q6_K, (2048, 2048)), (G.Q5_0, (2048, 1408))]:
        raw = make_raw(gt, r, c, rng)
        X = rng.standard_normal((T, c)).astype(np.float32)
        out = np.empty((T, r), np.float32)
        matmul(raw, int(gt), X, out)
        reps = max(3, a.reps // 10)
        dt = best(lambda: matmul(raw, int(gt), X, out), reps)
        W = rng.standard_normal((r, c)).astype(np.float32)
        dtb = best(lambda: np.matmul(X, W.T, out=out), reps)
        fl = 2 * T * r * c
        print(f"  {gt.name:5s} {r:5d}x{c:<5d} {fl/dt/1e9:7.1f} GFLOP/s ({dt*1e3:6.2f} ms)   "
              f"sgemm {fl/dtb/1e9:7.1f} GFLOP/s ({dtb*1e3:6.2f} ms)  ratio {dtb/dt:4.2f}", flush=True)


def sec_overhead(a, rng):
    """Per-call cost of an (almost) empty parallel region vs the serial kernel."""
    raw = make_raw(G.Q4_1, 2, 32, rng)
    x = np.ones(32, np.float32)
    out = np.empty(2, np.float32)
    res = {}
    for name, lim in (("serial", 1 << 62), ("parallel", 0)):
        registry.PAR_MIN_BYTES = lim
        matvec(raw, int(G.Q4_1), x, out)
        ts = []
        for _ in range(2000):
            t = time.perf_counter()
            matvec(raw, int(G.Q4_1), x, out)
            ts.append(time.perf_counter() - t)
        ts.sort()
        res[name] = (ts[0], ts[len(ts) // 2])
    print(f"per-call (2x32 Q4_1 matvec) serial min {res['serial'][0]*1e6:.1f} us median "
          f"{res['serial'][1]*1e6:.1f} us; parallel min {res['parallel'][0]*1e6:.1f} us median "
          f"{res['parallel'][1]*1e6:.1f} us  [layer {numba.threading_layer()}]")


def main():
    ap = argparse.ArgumentParser(epilog="AVX2-only features: " + AVX2_FEATURES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--types", default="Q4_1,Q8_0,Q4_K,Q6_K,Q5_0,Q4_0,Q5_1,Q5_K,Q2_K,Q3_K,F16,BF16,F32")
    ap.add_argument("--sections", default="mv,smol,fused,prefill,overhead")
    ap.add_argument("--par-min-bytes", type=int, default=None)
    ap.add_argument("--backoff", action="store_true",
                    help="keep the contention back-off (default: off, so parallel kernels are what is timed)")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    if a.par_min_bytes is not None:
        registry.PAR_MIN_BYTES = a.par_min_bytes
    if not a.backoff:
        registry.PAR_BACKOFF_S = 0.0
    rng = np.random.default_rng(0)
    print(f"numba threads={numba.get_num_threads()} par_min_bytes={registry.PAR_MIN_BYTES}")
    for s in a.sections.split(","):
        globals()["sec_" + s](a, rng)


if __name__ == "__main__":
    main()
