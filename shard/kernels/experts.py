"""Fused routed-expert products for decode-sized batches (ik_llama.cpp's -fmoe is the idea).

A MoE layer's routed experts for T <= 16 tokens run as TWO parallel regions instead of three
gathered products with numpy between them:

    gate_up   h[p, r] = silu(gate_e[r] . x_t) * (up_e[r] . x_t)      for every pair p = (t, e)
              x of each token quantized once for both products; items = (pair, row), split
              evenly over the threads by numba's static prange schedule.  Extra "pairs" can
              be rows of a shared expert (same type and width as the routed gate/up).
    down_sum  out[t, d] = sum over token t's pairs p of w_p * (down_e[d] . h_p)
              h quantized once per pair; items = (token, output row): no two items write
              the same element, and the routing weights and the sum over experts are fused.

Every dot product is the same row kernel on the same quantized input as the unfused gathered
path (registry.matvec_gather), so gate / up / down values are bit-identical to it; silu and
the expert sum run in numba float32 instead of numpy (differences of float rounding).

Shapes: flat = read-only 1-D uint8 view of one buffer holding the matrices; *offs = int64 byte
offsets of each pair's matrix; stride = row stride; nrows = rows per matrix; nb = SIMD blocks
per row; X float32 [T, cols]; xi int64 [P] (the token of each pair); H float32 [P, F];
pair_lo / pair_hi int64 [T] (each token's pairs are pairs pair_lo[t]:pair_hi[t]); w float32 [P].
"""
import numpy as np
from numba import literally, njit, prange

from .drivers import _prep_vectors
from .drivers_i8 import quant_x
from .rows import dot_any
from .rows_i8 import dot_i8_any


@njit(cache=True, fastmath=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=True, parallel=True, fastmath=True)
def gate_up_i8(kind, flat, goffs, uoffs, stride, nrows, nb, tab, X, xi, H):
    literally(kind)
    xq, xd, xs = quant_x(kind, X)
    for it in prange(goffs.shape[0] * nrows):
        i = it // nrows
        r = it - i * nrows
        j = xi[i]
        g = dot_i8_any(kind, flat, goffs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])
        u = dot_i8_any(kind, flat, uoffs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])
        H[i, r] = _silu_mul(g, u)


@njit(cache=True, parallel=True, fastmath=True)
def gate_up_float(kind, flat, goffs, uoffs, stride, nrows, nb, gsz, tab, perm, fac, X, xi, H):
    literally(kind)
    XP, XS = _prep_vectors(X, gsz, perm, fac)
    for it in prange(goffs.shape[0] * nrows):
        i = it // nrows
        r = it - i * nrows
        j = xi[i]
        g = dot_any(kind, flat, goffs[i] + r * stride, nb, tab, XP[j], XS[j])
        u = dot_any(kind, flat, uoffs[i] + r * stride, nb, tab, XP[j], XS[j])
        H[i, r] = _silu_mul(g, u)


@njit(cache=True, parallel=True, fastmath=True)
def down_sum_i8(kind, flat, doffs, stride, nrows, nb, tab, H, pair_lo, pair_hi, w, out):
    literally(kind)
    hq, hd, hs = quant_x(kind, H)
    T = pair_lo.shape[0]
    for it in prange(T * nrows):
        t = it // nrows
        r = it - t * nrows
        acc = np.float32(0)
        for p in range(pair_lo[t], pair_hi[t]):
            acc += w[p] * dot_i8_any(kind, flat, doffs[p] + r * stride, nb, tab, hq[p], hd[p], hs[p])
        out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=True)
def down_sum_float(kind, flat, doffs, stride, nrows, nb, gsz, tab, perm, fac, H, pair_lo, pair_hi, w, out):
    literally(kind)
    HP, HS = _prep_vectors(H, gsz, perm, fac)
    T = pair_lo.shape[0]
    for it in prange(T * nrows):
        t = it // nrows
        r = it - t * nrows
        acc = np.float32(0)
        for p in range(pair_lo[t], pair_hi[t]):
            acc += w[p] * dot_any(kind, flat, doffs[p] + r * stride, nb, tab, HP[p], HS[p])
        out[t, r] = acc
