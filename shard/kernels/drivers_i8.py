"""numba drivers over the 8-bit activation row kernels of rows_i8.py (only on CPUs with AVX-512
VNNI; see registry.INT8_ACTIVATIONS).  Each driver quantizes its activations once per call the
way llama.cpp does for the weight type, then runs the integer row kernels:

    Q4_K, Q5_K     x per 256 elements (Q8_K)           quant_x_q8k
    Q6_K           x per 256 elements (Q8_K + sums)    quant_x_q8k16
    Q4_1           x per 32 elements (Q8_1)            quant_x_q8_32

Two shapes of product, each serial and parallel, specialised per type (the `kind` argument is
a compile-time literal, as in drivers.py; rows_i8.dot_i8_any picks the type's row kernel):
    mv_*   out[i, r] = row r of the matrix at flat[offs[i]] . X[xi[i]]    (matvec and the
           gathered per-token products: a token's chosen experts, MLA's per-head matrices)
    mm_*   out [T, nrows] = X [T, n] @ W.T, each row decoded once per 16 vectors (batched
           decode, and prompts: 1.4-5.8x the dequantize + sgemm path for Q4_K at T = 32-512);
           Q4_K, Q5_K and Q6_K (rows_i8.MULTI_KINDS)

Measured and dropped (BENCHMARKS.md, session 3): a Q8_0 kernel (weights + 128 as unsigned bytes,
minus 128 * sum(xq)) was 1.1-1.25x the float kernel's speed and 3.5% of a DeepSeek-shaped decode
step, but SmolLM2's output matrix is Q8_0, and 8-bit inputs there flipped the first greedy token
of its demo answer (logit margin 0.08).

Measured and dropped: grouping a batch's (token, expert) pairs by expert, so that each expert
is read once and each row decoded once for its tokens, was 10-30% slower at T = 8 than one
product per pair: the repeated experts come from the 32 MiB L3 anyway, and the multi-token
kernel costs more per token than the one-token kernel.

Cache note as in drivers.py: numba's cache of this package is dropped whenever any of its files changes (kernels/__init__.py).
"""
import numpy as np
from numba import literally, njit, prange
from numba.core import types
from numba.extending import overload

from .rows_i8 import _Q4_1, _Q6_K, _Q8_0, MULTI_MAX_T, dot_i8_any, dot_i8_multi_any

ROW_BLOCK = 32  # rows per parallel work item of mm_*


@njit(cache=True, fastmath=True)
def quant_x_q8k(X):
    """X float32 [n, cols] -> (xq int8 [n, cols], xd float32 [n, cols/256], xs float32
    [n, cols/32]): per 256 elements xq = round(x * 127 / max|x|), xd = max|x| / 127 (llama.cpp's
    Q8_K), and xs the exact sums of x over 32-element groups (for the Q4_K mins)."""
    n, cols = X.shape
    nb = cols // 256
    xq = np.empty((n, cols), np.int8)
    xd = np.empty((n, nb), np.float32)
    xs = np.empty((n, cols // 32), np.float32)
    for j in range(n):
        for b in range(nb):
            amax = np.float32(0)
            for i in range(256):
                amax = max(amax, abs(X[j, b * 256 + i]))
            if amax == 0:
                xd[j, b] = 0
                for i in range(256):
                    xq[j, b * 256 + i] = 0
            else:
                inv = np.float32(127) / amax
                xd[j, b] = amax / np.float32(127)
                for i in range(256):
                    v = np.rint(X[j, b * 256 + i] * inv)
                    xq[j, b * 256 + i] = np.int8(min(max(v, -127.0), 127.0))
        for g in range(cols // 32):
            s = np.float32(0)
            for i in range(32):
                s += X[j, g * 32 + i]
            xs[j, g] = s
    return xq, xd, xs


@njit(cache=True, fastmath=True)
def quant_x_q8k16(X):
    """quant_x_q8k's xq and xd, and xb int32 [n, cols/16]: the sums of xq over 16 elements (the
    Q6_K kernel subtracts 32 * scale * xb: its weights are stored as q + 32)."""
    xq, xd, _ = quant_x_q8k(X)
    n, cols = X.shape
    xb = np.empty((n, cols // 16), np.int32)
    for j in range(n):
        for g in range(cols // 16):
            s = 0
            for i in range(16):
                s += np.int32(xq[j, g * 16 + i])
            xb[j, g] = s
    return xq, xd, xb


@njit(cache=True, fastmath=True)
def quant_x_q8_32(X):
    """X float32 [n, cols] -> (xq int8 [n, cols + 32] (zero padded), xd float32 [n, cols/32 + 1],
    xs float32 [n, cols/32]): 8-bit x with one scale per 32 elements (llama.cpp's Q8_1 layout)
    for the Q4_1 rows, and the exact block sums of x for its offsets m."""
    n, cols = X.shape
    nb = cols // 32
    xq = np.zeros((n, cols + 32), np.int8)
    xd = np.zeros((n, nb + 1), np.float32)
    xs = np.empty((n, nb), np.float32)
    for j in range(n):
        for b in range(nb):
            amax = np.float32(0)
            s = np.float32(0)
            for i in range(32):
                v = X[j, b * 32 + i]
                amax = max(amax, abs(v))
                s += v
            xs[j, b] = s
            if amax > 0:
                inv = np.float32(127) / amax
                xd[j, b] = amax / np.float32(127)
                for i in range(32):
                    v = np.rint(X[j, b * 32 + i] * inv)
                    xq[j, b * 32 + i] = np.int8(min(max(v, -127.0), 127.0))
    return xq, xd, xs


@njit(cache=True, fastmath=True)
def quant_x_u8_64(X):
    """X float32 [n, cols] (cols a multiple of 64) -> (xu uint8 [n, cols] = round(x / dx) + 128,
    xd float32 [n, cols / 64] = max|x| / 127 of each 64 elements, xs float32 [n, 1] unused): the
    x operand of the Q8_0 multi-token kernel (stored unsigned)."""
    n, cols = X.shape
    xu = np.empty((n, cols), np.uint8)
    xd = np.empty((n, cols // 64), np.float32)
    for j in range(n):
        for b in range(cols // 64):
            amax = np.float32(0)
            for i in range(64):
                amax = max(amax, abs(X[j, b * 64 + i]))
            xd[j, b] = amax / np.float32(127)
            inv = np.float32(127) / amax if amax > 0 else np.float32(0)
            for i in range(64):
                v = np.rint(X[j, b * 64 + i] * inv)
                xu[j, b * 64 + i] = np.uint8(np.int32(min(max(v, -127.0), 127.0)) + 128)
    return xu, xd, np.zeros((n, 1), np.float32)


def quant_x(kind, X):
    """-> (xq, xd, xs): X quantized the way type `kind`'s row kernels read it (numba only)."""
    raise NotImplementedError


@overload(quant_x, jit_options={"fastmath": True})
def _quant_x(kind, X):
    if not isinstance(kind, types.IntegerLiteral):
        return None
    if kind.literal_value == _Q6_K:
        return lambda kind, X: quant_x_q8k16(X)
    if kind.literal_value == _Q4_1:
        return lambda kind, X: quant_x_q8_32(X)
    if kind.literal_value == _Q8_0:
        return lambda kind, X: quant_x_u8_64(X)
    return lambda kind, X: quant_x_q8k(X)


# -- one vector per matrix (matvec, gathered per-token products) --------------------------------

@njit(cache=True, parallel=True, fastmath=True)
def mv_i8_parallel(kind, flat, offs, stride, nrows, nb, tab, X, xi, out):
    literally(kind)
    xq, xd, xs = quant_x(kind, X)
    for t in prange(offs.shape[0] * nrows):
        i = t // nrows
        r = t - i * nrows
        j = xi[i]
        out[i, r] = dot_i8_any(kind, flat, offs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])


@njit(cache=True, fastmath=True)
def mv_i8_serial(kind, flat, offs, stride, nrows, nb, tab, X, xi, out):
    literally(kind)
    xq, xd, xs = quant_x(kind, X)
    for i in range(offs.shape[0]):
        j = xi[i]
        for r in range(nrows):
            out[i, r] = dot_i8_any(kind, flat, offs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])


# -- T vectors through one matrix ---------------------------------------------------------------

@njit(cache=True, fastmath=True)
def _mm_rows(kind, flat, stride, r0, r1, nb, tab, xq, xd, xs, out):
    """Rows r0:r1 for all tokens, 16 at a time: the rows' bytes (32 x 1152 for 2048 Q4_K
    columns) stay in L2 across the token chunks, each chunk's 8-bit x (16 x 2048 bytes) in L1."""
    literally(kind)
    T = xq.shape[0]
    for t0 in range(0, T, MULTI_MAX_T):
        tn = min(MULTI_MAX_T, T - t0)
        for r in range(r0, r1):
            dot_i8_multi_any(kind, flat, r * stride, nb, tab, xq, xd, xs, out, r, t0, tn)


@njit(cache=True, parallel=True, fastmath=True)
def mm_i8_parallel(kind, flat, stride, nrows, nb, tab, X, out, rb):
    """Items = (block of rb rows, group of MULTI_MAX_T tokens), the group index inner so that a
    thread's consecutive items reuse the same rows from L2 (split.rows_per_item picks rb)."""
    literally(kind)
    xq, xd, xs = quant_x(kind, X)
    T = X.shape[0]
    ntg = (T + MULTI_MAX_T - 1) // MULTI_MAX_T
    for i in prange(((nrows + rb - 1) // rb) * ntg):
        b = i // ntg
        t0 = (i - b * ntg) * MULTI_MAX_T
        tn = min(MULTI_MAX_T, T - t0)
        for r in range(b * rb, min(nrows, (b + 1) * rb)):
            dot_i8_multi_any(kind, flat, r * stride, nb, tab, xq, xd, xs, out, r, t0, tn)


@njit(cache=True, fastmath=True)
def mm_i8_serial(kind, flat, stride, nrows, nb, tab, X, out, rb):
    """mm_i8_parallel on the calling thread (rb unused: blocks of ROW_BLOCK rows)."""
    literally(kind)
    xq, xd, xs = quant_x(kind, X)
    for i in range((nrows + ROW_BLOCK - 1) // ROW_BLOCK):
        _mm_rows(kind, flat, stride, i * ROW_BLOCK, min(nrows, (i + 1) * ROW_BLOCK), nb, tab, xq, xd, xs, out)
