"""Fast matvec kernels (decode path): out[r] = sum_c W[r, c] * x[c] on raw GGUF blocks.

Shape of every kernel: a per-row function walks the row's blocks and accumulates
  scale * (SIMD block dot product from simd.py)  [+ min * block-sum of x]
in float32; drivers run it over rows serially (small matrices: thread launch costs more than
the work) or with prange (static schedule: each thread gets a contiguous range of rows).
`xs[i]` = sum of x[32 i : 32 i + 32], computed once per call, serves the min/offset terms.
Row r of W starts at flat[r * stride] (see registry._flat).
"""
import numpy as np
from numba import njit, prange

from ._common import f16, u32_as_f32
from .dequant import k_scale_min
from .simd import row_q4_1_simd, dot_bit32, dot_hi4x32, dot_i8x32, dot_lo4x32, dot_q6x16, dot_qh32, dot_u4x32


@njit(cache=True, inline="always")
def _xsums(x):
    n = x.shape[0] // 32
    xs = np.empty(n, np.float32)
    for i in range(n):
        s = np.float32(0)
        for j in range(32):
            s += x[32 * i + j]
        xs[i] = s
    return xs


# ---- per-row functions: (flat, o = row start, nb = blocks per row, tab, x, xs) -> float32 ----

@njit(cache=True, inline="always", fastmath=True)
def row_q4_0(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 18 B: d | qs[16]; value = d * (q - 8)
        acc += f16(flat, o, tab) * (dot_u4x32(flat, o + 2, x, 32 * b) - np.float32(8) * xs[b])
        o += 18
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q4_1(flat, o, nb, tab, x, xs):
    # 20 B blocks: d | m | qs[16]; value = d * q + m. Whole-row SIMD loop with vector
    # accumulators (simd.row_q4_1_simd): 1.6x the per-block-dot version (SmolLM2's main type).
    return row_q4_1_simd(flat, o, nb, tab, x, xs)


@njit(cache=True, inline="always", fastmath=True)
def row_q5_0(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 22 B: d | qh u32 | qs[16]; value = d * (q + 16 * bit - 16)
        s = dot_u4x32(flat, o + 6, x, 32 * b) + np.float32(16) * (dot_qh32(flat, o + 2, x, 32 * b) - xs[b])
        acc += f16(flat, o, tab) * s
        o += 22
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q5_1(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 24 B: d | m | qh u32 | qs[16]; value = d * (q + 16 * bit) + m
        s = dot_u4x32(flat, o + 8, x, 32 * b) + np.float32(16) * dot_qh32(flat, o + 4, x, 32 * b)
        acc += f16(flat, o, tab) * s + f16(flat, o + 2, tab) * xs[b]
        o += 24
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q8_0(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 34 B: d | int8[32]
        acc += f16(flat, o, tab) * dot_i8x32(flat, o + 2, x, 32 * b)
        o += 34
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q4_k(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 144 B: d | dmin | scales[12] | qs[128]; 8 sub-blocks of 32
        sq = np.float32(0)
        sm = np.float32(0)
        for c in range(4):  # sub-blocks 2c (low nibbles) and 2c+1 (high) share 32 bytes
            sc0, mn0 = k_scale_min(flat, o + 4, 2 * c)
            sc1, mn1 = k_scale_min(flat, o + 4, 2 * c + 1)
            xo = 256 * b + 64 * c
            sq += np.float32(sc0) * dot_lo4x32(flat, o + 16 + 32 * c, x, xo)
            sq += np.float32(sc1) * dot_hi4x32(flat, o + 16 + 32 * c, x, xo + 32)
            sm += np.float32(mn0) * xs[8 * b + 2 * c] + np.float32(mn1) * xs[8 * b + 2 * c + 1]
        acc += f16(flat, o, tab) * sq - f16(flat, o + 2, tab) * sm
        o += 144
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q5_k(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 176 B: d | dmin | scales[12] | qh[32] | qs[128]
        sq = np.float32(0)
        sm = np.float32(0)
        for c in range(4):
            sc0, mn0 = k_scale_min(flat, o + 4, 2 * c)
            sc1, mn1 = k_scale_min(flat, o + 4, 2 * c + 1)
            xo = 256 * b + 64 * c
            q0 = dot_lo4x32(flat, o + 48 + 32 * c, x, xo) + np.float32(16) * dot_bit32(flat, o + 16, 2 * c, x, xo)
            q1 = (dot_hi4x32(flat, o + 48 + 32 * c, x, xo + 32)
                  + np.float32(16) * dot_bit32(flat, o + 16, 2 * c + 1, x, xo + 32))
            sq += np.float32(sc0) * q0 + np.float32(sc1) * q1
            sm += np.float32(mn0) * xs[8 * b + 2 * c] + np.float32(mn1) * xs[8 * b + 2 * c + 1]
        acc += f16(flat, o, tab) * sq - f16(flat, o + 2, tab) * sm
        o += 176
    return acc


@njit(cache=True, inline="always", fastmath=True)
def row_q6_k(flat, o, nb, tab, x, xs):
    acc = np.float32(0)
    for b in range(nb):  # 210 B: ql[128] | qh[64] | scales int8[16] | d
        s = np.float32(0)
        for h in range(2):          # two halves of 128 elements
            for k in range(4):      # 32-element chunk inside the half
                for half in range(2):  # 16-element scale groups
                    e = 128 * h + 32 * k + 16 * half
                    sc = np.int32(flat[o + 192 + e // 16])
                    sc = sc - 256 if sc >= 128 else sc
                    d = dot_q6x16(flat, o + 64 * h + 32 * (k % 2) + 16 * half, 4 * (k // 2),
                                  o + 128 + 32 * h + 16 * half, 2 * k, x, 256 * b + e)
                    s += np.float32(sc) * d
        acc += f16(flat, o + 208, tab) * s
        o += 210
    return acc


# ---- drivers: one serial + one parallel per type (explicit so each is cached on disk) ----

@njit(cache=True, fastmath=True)
def s_q4_0(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q4_0(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q4_0(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q4_0(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q4_1(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q4_1(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q4_1(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q4_1(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q5_0(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q5_0(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q5_0(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q5_0(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q5_1(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q5_1(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q5_1(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q5_1(flat, r * stride, ncols // 32, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q8_0(flat, stride, nrows, ncols, tab, x, out):
    for r in range(nrows):
        out[r] = row_q8_0(flat, r * stride, ncols // 32, tab, x, x)


@njit(cache=True, parallel=True, fastmath=True)
def p_q8_0(flat, stride, nrows, ncols, tab, x, out):
    for r in prange(nrows):
        out[r] = row_q8_0(flat, r * stride, ncols // 32, tab, x, x)


@njit(cache=True, fastmath=True)
def s_q4_k(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q4_k(flat, r * stride, ncols // 256, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q4_k(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q4_k(flat, r * stride, ncols // 256, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q5_k(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in range(nrows):
        out[r] = row_q5_k(flat, r * stride, ncols // 256, tab, x, xs)


@njit(cache=True, parallel=True, fastmath=True)
def p_q5_k(flat, stride, nrows, ncols, tab, x, out):
    xs = _xsums(x)
    for r in prange(nrows):
        out[r] = row_q5_k(flat, r * stride, ncols // 256, tab, x, xs)


@njit(cache=True, fastmath=True)
def s_q6_k(flat, stride, nrows, ncols, tab, x, out):
    for r in range(nrows):
        out[r] = row_q6_k(flat, r * stride, ncols // 256, tab, x, x)


@njit(cache=True, parallel=True, fastmath=True)
def p_q6_k(flat, stride, nrows, ncols, tab, x, out):
    for r in prange(nrows):
        out[r] = row_q6_k(flat, r * stride, ncols // 256, tab, x, x)


# ---- float types: flat is viewed by the caller as float32 / uint16, stride in elements ----

@njit(cache=True, parallel=True, fastmath=True)
def p_f32(flat, stride, nrows, ncols, tab, x, out):
    for r in prange(nrows):
        w = flat[r * stride:r * stride + ncols]
        s = np.float32(0)
        for j in range(ncols):
            s += w[j] * x[j]
        out[r] = s


@njit(cache=True, parallel=True, fastmath=True)
def p_f16(flat, stride, nrows, ncols, tab, x, out):
    for r in prange(nrows):
        w = flat[r * stride:r * stride + ncols]
        s = np.float32(0)
        for j in range(ncols):
            s += tab[w[j]] * x[j]
        out[r] = s


@njit(cache=True, parallel=True, fastmath=True)
def p_bf16(flat, stride, nrows, ncols, tab, x, out):
    for r in prange(nrows):
        w = flat[r * stride:r * stride + ncols]
        s = np.float32(0)
        for j in range(ncols):
            s += u32_as_f32(np.uint32(w[j]) << np.uint32(16)) * x[j]
        out[r] = s
