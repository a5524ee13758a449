"""numba drivers over the rows.py row kernels: matvec (serial / parallel), row dequantization,
and the fused small-batch matmul (T = 2..16 vectors share one dequantization of each row).

Every driver takes the ggml type id `kind` as a compile-time literal (numba.literally): one
specialisation per type is compiled and cached on first use; rows.dot_any / deq_any pick that
type's IR at typing time, so it is inlined into the driver's row loop. Call them through registry._entry(), which looks up the compiled
entry point once: numba's dispatcher would redo the literal typing on every call (~16 ms).

Cache note: numba's on-disk cache (cache=True) only checks THIS file, though the row kernels
of rows.py / rows_perm.py / rows_i8.py are inlined here; so numba's cache of this package is dropped whenever any of its files changes (kernels/__init__.py).

Shapes: flat = 1-D read-only uint8 raw bytes, row r at flat[r * stride]; nb = blocks per row
(32-element "blocks" for F32/F16/BF16, whose tail columns are handled by the caller);
x float32 (ncols,), X float32 (T, ncols) C-order, out (nrows,) or (T, nrows).
"""
import numpy as np
from numba import literally, njit, prange

from .rows import deq_any, dot_any, dotm2_any, dotm3_any

ROW_CHUNK = 8  # rows per parallel work item of the fused matmul (one scratch row per item)


@njit(cache=True)
def xsums(x, gsz):
    """Sums of x over consecutive gsz-element groups (the offset terms of Q4_1/Q4_K/Q2_K...).
    No fastmath: a sequential sum, the same wherever it is inlined (batch invariance)."""
    n = x.shape[0] // gsz
    xs = np.empty(n, np.float32)
    for i in range(n):
        s = np.float32(0)
        for j in range(gsz):
            s += x[gsz * i + j]
        xs[i] = s
    return xs


@njit(cache=True)
def permute(x, perm, fac):
    """x_perm[i] = x[perm[i]] * fac[i]: x in the element order (and power-of-two scaling) the
    dword-lane decoders read (rows_perm)."""
    xp = np.empty(perm.shape[0], np.float32)
    for i in range(perm.shape[0]):
        xp[i] = x[perm[i]] * fac[i]
    return xp


@njit(cache=True, fastmath=True)
def mv_serial(kind, flat, stride, nrows, nb, gsz, tab, perm, fac, x, out):
    literally(kind)
    xs = xsums(x, gsz)
    xp = permute(x, perm, fac)
    for r in range(nrows):
        out[r] = dot_any(kind, flat, r * stride, nb, tab, xp, xs)


@njit(cache=True, parallel=True, fastmath=True)
def mv_parallel(kind, flat, stride, nrows, nb, gsz, tab, perm, fac, x, out):
    literally(kind)
    xs = xsums(x, gsz)
    xp = permute(x, perm, fac)
    for r in prange(nrows):  # static schedule: each thread a contiguous range of rows
        out[r] = dot_any(kind, flat, r * stride, nb, tab, xp, xs)


@njit(cache=True, parallel=True)
def deq_rows(kind, flat, stride, nrows, nb, tab, out):
    """out (nrows, >= nb*bs) float32 C-order <- rows dequantized bit-exactly."""
    literally(kind)
    for r in prange(nrows):
        deq_any(kind, flat, r * stride, nb, tab, out[r], 0)


@njit(cache=True)
def deq_rows_serial(kind, flat, stride, nrows, nb, tab, out):
    """deq_rows on the calling thread: used next to BLAS calls, whose spinning threads make a
    numba parallel region right after them take milliseconds on a 2-core machine."""
    literally(kind)
    for r in range(nrows):
        deq_any(kind, flat, r * stride, nb, tab, out[r], 0)


@njit(cache=True, inline="always", fastmath=True)
def _dots2(w, r2, X, out, r, n):
    """out[t, r + i] = w[i, :n] . X[t, :n] for i < r2 (1 or 2 dequantized rows in w) and all t.
    Blocks of 2 rows x 4 vectors: each loaded float feeds 2-4 FMAs (a 1x1 dot is load-bound)."""
    T = X.shape[0]
    w0 = w[0]
    w1 = w[r2 - 1]  # == w0 for a single row (its results are simply not stored)
    t = 0
    while t + 4 <= T:
        x0, x1, x2, x3 = X[t], X[t + 1], X[t + 2], X[t + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
        for j in range(n):
            u, v = w0[j], w1[j]
            y0, y1, y2, y3 = x0[j], x1[j], x2[j], x3[j]
            a0 += u * y0
            a1 += u * y1
            a2 += u * y2
            a3 += u * y3
            b0 += v * y0
            b1 += v * y1
            b2 += v * y2
            b3 += v * y3
        out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
        if r2 == 2:
            out[t, r + 1], out[t + 1, r + 1], out[t + 2, r + 1], out[t + 3, r + 1] = b0, b1, b2, b3
        t += 4
    while t + 2 <= T:
        x0, x1 = X[t], X[t + 1]
        a0 = a1 = b0 = b1 = np.float32(0)
        for j in range(n):
            u, v = w0[j], w1[j]
            a0 += u * x0[j]
            a1 += u * x1[j]
            b0 += v * x0[j]
            b1 += v * x1[j]
        out[t, r], out[t + 1, r] = a0, a1
        if r2 == 2:
            out[t, r + 1], out[t + 1, r + 1] = b0, b1
        t += 2
    if t < T:
        x0 = X[t]
        a0 = b0 = np.float32(0)
        for j in range(n):
            a0 += w0[j] * x0[j]
            b0 += w1[j] * x0[j]
        out[t, r] = a0
        if r2 == 2:
            out[t, r + 1] = b0


@njit(cache=True, inline="always", fastmath=True)
def _dots4(w, rk, X, out, r, n):
    """As _dots2 for up to 4 rows: 4 rows x 4 vectors = 16 accumulators per pass (0.5 loads per
    FMA). Only for AVX-512 targets (32 vector registers): with 16 AVX2 registers it spills and
    runs slower than _dots2 (measured 59 vs 70 GFLOP/s), on AVX-512 108 vs 70 GFLOP/s."""
    T = X.shape[0]
    w0, w1, w2, w3 = w[0], w[min(1, rk - 1)], w[min(2, rk - 1)], w[rk - 1]
    t = 0
    while t + 4 <= T:
        x0, x1, x2, x3 = X[t], X[t + 1], X[t + 2], X[t + 3]
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0)
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0)
        for j in range(n):
            y0, y1, y2, y3 = x0[j], x1[j], x2[j], x3[j]
            u = w0[j]
            a00 += u * y0
            a01 += u * y1
            a02 += u * y2
            a03 += u * y3
            u = w1[j]
            a10 += u * y0
            a11 += u * y1
            a12 += u * y2
            a13 += u * y3
            u = w2[j]
            a20 += u * y0
            a21 += u * y1
            a22 += u * y2
            a23 += u * y3
            u = w3[j]
            a30 += u * y0
            a31 += u * y1
            a32 += u * y2
            a33 += u * y3
        res = ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33))
        for i in range(rk):
            out[t, r + i], out[t + 1, r + i], out[t + 2, r + i], out[t + 3, r + i] = res[i]
        t += 4
    if t + 2 <= T:  # 2 of the remaining vectors
        x0, x1 = X[t], X[t + 1]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
        for j in range(n):
            y, z = x0[j], x1[j]
            a0 += w0[j] * y
            a1 += w1[j] * y
            a2 += w2[j] * y
            a3 += w3[j] * y
            b0 += w0[j] * z
            b1 += w1[j] * z
            b2 += w2[j] * z
            b3 += w3[j] * z
        res2 = ((a0, b0), (a1, b1), (a2, b2), (a3, b3))
        for i in range(rk):
            out[t, r + i], out[t + 1, r + i] = res2[i]
        t += 2
    if t < T:  # the last vector
        x0 = X[t]
        a0 = a1 = a2 = a3 = np.float32(0)
        for j in range(n):
            y = x0[j]
            a0 += w0[j] * y
            a1 += w1[j] * y
            a2 += w2[j] * y
            a3 += w3[j] * y
        res1 = (a0, a1, a2, a3)
        for i in range(rk):
            out[t, r + i] = res1[i]


@njit(cache=True, parallel=True, fastmath=True)
def mm_fused4_parallel(kind, flat, stride, nrows, nb, n, tab, X, out):
    """mm_fused_parallel with 4-row passes (_dots4, AVX-512 targets)."""
    literally(kind)
    nch = (nrows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(nch):
        w = np.empty((4, n), np.float32)
        r1 = min(nrows, (c + 1) * ROW_CHUNK)
        for r in range(c * ROW_CHUNK, r1, 4):
            rk = min(4, r1 - r)
            for i in range(rk):
                deq_any(kind, flat, (r + i) * stride, nb, tab, w[i], 0)
            _dots4(w, rk, X, out, r, n)


@njit(cache=True, fastmath=True)
def mm_fused4_serial(kind, flat, stride, nrows, nb, n, tab, X, out):
    literally(kind)
    w = np.empty((4, n), np.float32)
    for r in range(0, nrows, 4):
        rk = min(4, nrows - r)
        for i in range(rk):
            deq_any(kind, flat, (r + i) * stride, nb, tab, w[i], 0)
        _dots4(w, rk, X, out, r, n)


@njit(cache=True, parallel=True, fastmath=True)
def mm_fused_parallel(kind, flat, stride, nrows, nb, n, tab, X, out):
    """out (T, nrows) = X (T, ncols) @ W.T, each row of W dequantized once into an L1-resident
    scratch row and reused for all T vectors (small-batch decode: weights read once).
    n = nb * block elements (< ncols only for F16/BF16 tails, which the caller adds)."""
    literally(kind)
    nch = (nrows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(nch):
        w = np.empty((2, n), np.float32)
        r1 = min(nrows, (c + 1) * ROW_CHUNK)
        for r in range(c * ROW_CHUNK, r1, 2):
            r2 = min(2, r1 - r)
            for i in range(r2):
                deq_any(kind, flat, (r + i) * stride, nb, tab, w[i], 0)
            _dots2(w, r2, X, out, r, n)


@njit(cache=True, fastmath=True)
def mm_fused_serial(kind, flat, stride, nrows, nb, n, tab, X, out):
    literally(kind)
    w = np.empty((2, n), np.float32)
    for r in range(0, nrows, 2):
        r2 = min(2, nrows - r)
        for i in range(r2):
            deq_any(kind, flat, (r + i) * stride, nb, tab, w[i], 0)
        _dots2(w, r2, X, out, r, n)


@njit(cache=True, inline="always", fastmath=True)
def _direct_row(kind, flat, o, nb, tab, X, out, r):
    if X.shape[0] == 2:
        a0, a1 = dotm2_any(kind, flat, o, nb, tab, X, 0)
        out[0, r], out[1, r] = a0, a1
    else:
        a0, a1, a2 = dotm3_any(kind, flat, o, nb, tab, X, 0)
        out[0, r], out[1, r], out[2, r] = a0, a1, a2


@njit(cache=True, parallel=True, fastmath=True)
def mm_direct_parallel(kind, flat, stride, nrows, nb, n, tab, X, out):
    """T = X.shape[0] in (2, 3): each block decoded once into registers and dotted with all T
    vectors (rows.make_dot_multi), no scratch row: measured 1.4-2.1x one matvec for T=2 vs
    1.65-2.5x with the scratch-row kernel; from T=4 on the scratch-row kernel is faster.
    Covers nb blocks of every row (float-type tails are added by the caller)."""
    literally(kind)
    for r in prange(nrows):
        _direct_row(kind, flat, r * stride, nb, tab, X, out, r)


@njit(cache=True, fastmath=True)
def mm_direct_serial(kind, flat, stride, nrows, nb, n, tab, X, out):
    literally(kind)
    for r in range(nrows):
        _direct_row(kind, flat, r * stride, nb, tab, X, out, r)


@njit(cache=True, fastmath=True)
def _prep_vectors(X, gsz, perm, fac):
    """Per input vector X[j]: the permuted/scaled copy and the group sums mv_* build for one x
    (the same functions, so every driver sees a token's x exactly as matvec does)."""
    n = X.shape[0]
    ng = X.shape[1] // gsz
    XP = np.empty((n, perm.shape[0]), np.float32)
    XS = np.empty((n, ng), np.float32)
    for j in range(n):
        XP[j] = permute(X[j], perm, fac)
        XS[j] = xsums(X[j], gsz)
    return XP, XS


ROWDOT_BLOCK = 16  # rows per work item of mm_rowdot (their bytes stay in L1/L2 across the tokens)


@njit(cache=True, fastmath=True)
def _rowdot_block(kind, flat, stride, r0, r1, nb, tab, XP, XS, out):
    literally(kind)
    for t in range(XP.shape[0]):
        for r in range(r0, r1):
            out[t, r] = dot_any(kind, flat, r * stride, nb, tab, XP[t], XS[t])


@njit(cache=True, parallel=True, fastmath=True)
def mm_rowdot_parallel(kind, flat, stride, nrows, nb, gsz, tab, perm, fac, X, out):
    """out[t, r] = row r . X[t] with matvec's own row kernel and prepared x for every token:
    the batch-invariant T-vector product (registry.BATCH_INVARIANT).  Each row is decoded once
    per token (no sharing across tokens, unlike mm_fused*)."""
    literally(kind)
    XP, XS = _prep_vectors(X, gsz, perm, fac)
    for i in prange((nrows + ROWDOT_BLOCK - 1) // ROWDOT_BLOCK):
        _rowdot_block(kind, flat, stride, i * ROWDOT_BLOCK, min(nrows, (i + 1) * ROWDOT_BLOCK), nb, tab,
                      XP, XS, out)


@njit(cache=True, fastmath=True)
def mm_rowdot_serial(kind, flat, stride, nrows, nb, gsz, tab, perm, fac, X, out):
    literally(kind)
    XP, XS = _prep_vectors(X, gsz, perm, fac)
    _rowdot_block(kind, flat, stride, 0, nrows, nb, tab, XP, XS, out)


@njit(cache=True, parallel=True, fastmath=True)
def mv_gather_parallel(kind, flat, offs, stride, nrows, nb, gsz, tab, perm, fac, X, xi, out):
    """out[i, r] = (row r of the matrix starting at flat[offs[i]]) . X[xi[i]]  for all i, r.

    Many small matrix-vector products (the chosen experts of a token, the heads of MLA's k_b/v_b)
    in ONE parallel region: one (i, r) range per thread instead of one region per matrix."""
    literally(kind)
    XP, XS = _prep_vectors(X, gsz, perm, fac)
    nrows_all = offs.shape[0] * nrows
    for t in prange(nrows_all):
        i = t // nrows
        r = t - i * nrows
        j = xi[i]
        out[i, r] = dot_any(kind, flat, offs[i] + r * stride, nb, tab, XP[j], XS[j])


@njit(cache=True, fastmath=True)
def mv_gather_serial(kind, flat, offs, stride, nrows, nb, gsz, tab, perm, fac, X, xi, out):
    literally(kind)
    XP, XS = _prep_vectors(X, gsz, perm, fac)
    for i in range(offs.shape[0]):
        j = xi[i]
        for r in range(nrows):
            out[i, r] = dot_any(kind, flat, offs[i] + r * stride, nb, tab, XP[j], XS[j])
