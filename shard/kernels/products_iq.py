"""Products for the low-bit types of dequant_iq.py (IQ1_S ... IQ4_XS, MXFP4, TQ1_0, TQ2_0), with
float32 activations: each weight row is decoded bit-exactly into a float32 scratch row (n_cols
floats: <= 28 KiB for n_cols = 7168, L1/L2) by dequant_iq's vectorised block decoders, then
dotted with x in a fixed order (simd_iq.dot32; simd_iq.dot8t for 8 vectors at once).

    matvec / gathered matvec (experts, FusedLinear chunks): parallel over (matrix, 16-row chunk)
    small batches (2 <= T <= SMALL_T): each row decoded once, dotted with all T vectors
    prompts (T > SMALL_T): dequantize a tile of rows, then numpy's sgemm (registry.matmul's
    prefill scheme)
    batch-invariant mode (registry.BATCH_INVARIANT): every T through matvec's row kernel

registry.py sends these types here at the top of each entry point (dequantize, matvec,
matvec_gather, matvec_offsets, matmul, experts_gate_up, experts_down_sum, warm_up).  Shapes
follow registry's conventions: raw uint8 (rows, row_bytes) with contiguous rows, flat = the
read-only 1-D view with row r at flat[r * stride], x float32 (n_cols,), X float32 C-contiguous
(T, n_cols).

With 8-bit activations (registry.INT8_ACTIVATIONS; DSD_EXACT_ACTIVATIONS=1 keeps float x) the
types of rows_iq8.IQ8_KINDS (IQ4_NL, IQ4_XS, MXFP4, IQ2_XXS, IQ3_XXS, IQ2_XS, IQ2_S, IQ3_S,
TQ2_0: all but IQ1_S, IQ1_M, TQ1_0) take rows_iq8's integer kernels instead for matvec, the
gathered products and T <= INT8_MAX_T (and every T in batch-invariant mode), as llama.cpp
computes them (x quantized per 32 / 256 elements); longer prompts keep dequantize + sgemm with
float x.

Cache note (as drivers.py): numba's on-disk cache of these kernels holds the decoders inlined
and is keyed on this file only, so numba's cache of this package is dropped whenever any of its files changes (kernels/__init__.py).
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from dsd.errors import GGUFError

from ._common import F16_TABLE
from .simd_iq import dot8t, dot32
from .dequant_iq import BLOCK_DECODERS, IQ_TYPES, deq_row, deq_rows_parallel, deq_rows_serial  # noqa: F401
from .rows_iq8 import IQ8_KINDS, mm_iq8_parallel, mm_iq8_serial, mv_iq8_parallel, mv_iq8_serial

ROWS_PER_ITEM = 16  # rows per parallel work item (one scratch row each; static prange schedule)
SMALL_T = 16        # up to this many vectors: fused kernel (each row decoded once for all of them)
# with 8-bit x (rows_iq8) up to this many: at T = 32-64 4-6x dequantize + sgemm on the AMD
# machine (noisy, shared host), at T = 512 0.75-1.0x of it, so longer prompts keep sgemm
INT8_MAX_T = 64
_TILE_ELEMS = 4 * 1024 * 1024  # prompt path: rows dequantized per sgemm (16 MiB of float32)


@njit(cache=True, inline="always")
def _dot(buf, x, n):
    """buf . x over n (a multiple of 32) floats, in one fixed order (simd_iq.dot32): a token's
    row is bit-identical from matvec, the gathered and fused-expert paths and the batch-invariant
    matmul, serial or parallel."""
    return dot32(buf, x, n)


@njit(cache=True, fastmath=True, inline="always")
def _gather_item(kind, flat, offs, rstride, nrows, nb, bs, tab, X, xi, out, it, nchunk, buf):
    i = it // nchunk
    r0 = (it % nchunk) * ROWS_PER_ITEM
    x = X[xi[i]]
    n = nb * bs
    for r in range(r0, min(nrows, r0 + ROWS_PER_ITEM)):
        deq_row(kind, flat, offs[i] + r * rstride, nb, tab, buf)
        out[i, r] = _dot(buf, x, n)


@njit(cache=True, fastmath=True, parallel=True)
def gather_parallel(kind, flat, offs, rstride, nrows, nb, bs, tab, X, xi, out):
    """out[i, r] = (row r of the matrix at flat[offs[i]]) . X[xi[i]]; offs / xi int64 [k],
    out float32 (k, nrows)."""
    nchunk = (nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in prange(offs.shape[0] * nchunk):
        buf = np.empty(nb * bs, np.float32)
        _gather_item(kind, flat, offs, rstride, nrows, nb, bs, tab, X, xi, out, it, nchunk, buf)


@njit(cache=True, fastmath=True)
def gather_serial(kind, flat, offs, rstride, nrows, nb, bs, tab, X, xi, out):
    nchunk = (nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    buf = np.empty(nb * bs, np.float32)
    for it in range(offs.shape[0] * nchunk):
        _gather_item(kind, flat, offs, rstride, nrows, nb, bs, tab, X, xi, out, it, nchunk, buf)


@njit(cache=True, fastmath=True, inline="always")
def _multi_item(kind, flat, stride, nrows, nb, bs, tab, X, out, c, buf):
    r0 = c * ROWS_PER_ITEM
    n = nb * bs
    T = X.shape[0]
    for r in range(r0, min(nrows, r0 + ROWS_PER_ITEM)):
        deq_row(kind, flat, r * stride, nb, tab, buf)
        for t0 in range(0, T - T % 8, 8):  # 8 vectors per pass over the decoded row
            dot8t(buf, X, t0, n, out, r)
        for t in range(T - T % 8, T):
            out[t, r] = _dot(buf, X[t], n)


@njit(cache=True, fastmath=True, parallel=True)
def multi_parallel(kind, flat, stride, nrows, nb, bs, tab, X, out):
    """out (T, nrows) = X (T, n_cols) @ W.T, each row of W decoded once for the T vectors."""
    for c in prange((nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        buf = np.empty(nb * bs, np.float32)
        _multi_item(kind, flat, stride, nrows, nb, bs, tab, X, out, c, buf)


@njit(cache=True, fastmath=True)
def multi_serial(kind, flat, stride, nrows, nb, bs, tab, X, out):
    buf = np.empty(nb * bs, np.float32)
    for c in range((nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        _multi_item(kind, flat, stride, nrows, nb, bs, tab, X, out, c, buf)


# -- Python entry points (called by registry.py; argument checks as registry's) ----------------

def is_iq(ggml_type: int) -> bool:
    return ggml_type in IQ_TYPES


_R = None


def _reg():
    """The registry module (imported on first use: it imports this module; an import statement
    per call cost ~4 us of a small matvec's ~17)."""
    global _R
    if _R is None:
        from . import registry
        _R = registry
    return _R


def _nb(ggml_type: int, n_cols: int):
    bs, ts = IQ_TYPES[ggml_type]
    return n_cols // bs, bs, ts


def row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes of a row of n_cols elements (registry.row_bytes for these types)."""
    bs, ts = IQ_TYPES[int(ggml_type)]
    if n_cols <= 0 or n_cols % bs:
        from gguf import GGMLQuantizationType as G
        name = G(int(ggml_type)).name
        raise GGUFError(f"row of {n_cols} elements is not a positive multiple of the {name} "
                        f"block size {bs}; such a tensor cannot be stored as {name}")
    return n_cols // bs * ts


def _timed(par: bool, nbytes: int, fn, *args) -> None:
    """Run a kernel and feed registry's contention back-off (see registry.PAR_BACKOFF_S)."""
    R = _reg()
    t0 = time.perf_counter()
    fn(*args)
    R._note(par, nbytes, time.perf_counter() - t0)


def dequantize(raw: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """raw (rows, row_bytes) -> float32 (rows, n_cols), bit-exact with gguf-py."""
    ggml_type = int(ggml_type)  # an IntEnum would be another numba specialisation
    R = _reg()
    flat, stride = R._flat(raw, row_bytes(ggml_type, n_cols))
    nb, _, _ = _nb(ggml_type, n_cols)
    out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
    if raw.shape[0]:
        # a few rows (an embedding lookup per token) on the calling thread
        fn = deq_rows_parallel if R._par_ok(raw.shape[0] * raw.shape[1]) else deq_rows_serial
        fn(ggml_type, flat, stride, raw.shape[0], nb, F16_TABLE, out)
    return out


def _check_out(out, shape):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise GGUFError(f"out must be a contiguous float32 array of shape {shape}")
    return out


def offsets(flat, offs, rstride: int, nrows: int, ggml_type: int, n_cols: int, X, xi, out):
    """registry.matvec_offsets for these types (prepared arguments, no validation)."""
    ggml_type = int(ggml_type)
    nb, bs, ts = _nb(ggml_type, n_cols)
    nbytes = offs.shape[0] * nrows * nb * ts
    R = _reg()
    par = R._par_ok(nbytes)
    if _int8(R, ggml_type):
        _timed(par, nbytes, _lit, mv_iq8_parallel if par else mv_iq8_serial,
               ggml_type, flat, offs, rstride, nrows, nb, F16_TABLE, X, xi, out)
        return out
    _timed(par, nbytes, gather_parallel if par else gather_serial,
           ggml_type, flat, offs, rstride, nrows, nb, bs, F16_TABLE, X, xi, out)
    return out


def _int8(R, ggml_type: int) -> bool:
    """8-bit activations and an integer kernel for the type (rows_iq8)."""
    return R.INT8_ACTIVATIONS and ggml_type in IQ8_KINDS


def _lit(fn, kind, *args):
    """rows_iq8 driver fn(kind, *args) with kind a compile-time literal, through registry._entry
    (its compiled entry point: the dispatcher redoes literal typing on every call, ~ms); the
    variant key holds every argument property that changes the numba types."""
    var = tuple((type(a), a.dtype, a.ndim, a.flags.writeable, a.flags.c_contiguous) if isinstance(a, np.ndarray)
                else type(a) for a in args)
    return _reg()._entry(fn, kind, var, *args)


_ZERO = np.zeros(1, np.int64)


def matvec(raw: np.ndarray, ggml_type: int, x: np.ndarray, out=None) -> np.ndarray:
    R = _reg()
    rb = raw.shape[1] if raw.ndim == 2 else -1
    _, ts = IQ_TYPES[ggml_type]
    flat, stride = R._flat(raw, rb if rb > 0 and rb % ts == 0 else -1)
    n_cols = rb // ts * IQ_TYPES[ggml_type][0]
    x = R._vec(x, n_cols)
    out = _check_out(out, (raw.shape[0],))
    if raw.shape[0]:
        offsets(flat, _ZERO, stride, raw.shape[0], ggml_type, n_cols, x[None], _ZERO, out[None])
    return out


def gather(stack, ggml_type: int, flat, mstride: int, rstride: int, ids, X, xi, out):
    """registry.matvec_gather after its argument checks: out[i] = W[ids[i]] @ X[xi[i]]."""
    ggml_type = int(ggml_type)
    E, nrows, rb = stack.shape
    offsets(flat, np.ascontiguousarray(ids * mstride, dtype=np.int64), rstride, nrows, ggml_type,
            rb // IQ_TYPES[ggml_type][1] * IQ_TYPES[ggml_type][0], X, xi, out)
    return out


def matmul(raw: np.ndarray, ggml_type: int, X: np.ndarray, out=None) -> np.ndarray:
    """X (T, n_cols) @ W.T -> (T, rows): one vector = matvec; T <= SMALL_T: each row decoded once
    for all T; longer prompts: dequantized tiles of rows and sgemm."""
    ggml_type = int(ggml_type)
    R = _reg()
    bs, ts = IQ_TYPES[ggml_type]
    rb = raw.shape[1] if raw.ndim == 2 else -1
    flat, stride = R._flat(raw, rb if rb > 0 and rb % ts == 0 else -1)
    n_cols, nb = rb // ts * bs, rb // ts
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != n_cols:
        raise GGUFError(f"X has shape {X.shape}, expected (T, {n_cols})")
    if X.dtype != np.float32 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float32)
    T, nrows = X.shape[0], raw.shape[0]
    if out is None:
        out = np.empty((T, nrows), dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (T, nrows):
        raise GGUFError(f"out must be a float32 array of shape ({T}, {nrows})")
    if T == 0 or nrows == 0:
        return out
    o = out if out.flags.c_contiguous else np.empty((T, nrows), np.float32)
    if T == 1 or R.BATCH_INVARIANT:
        # batch invariance: every token through matvec's row kernel on its own x (each row
        # decoded once per token), so row t is bit-identical to matvec(raw, X[t]) for any T
        # (serial or parallel as matvec decides it: by the matrix's bytes)
        par = R._par_ok(nrows * rb)
        if _int8(R, ggml_type):
            _timed(par, T * nrows * rb, _lit, mv_iq8_parallel if par else mv_iq8_serial, ggml_type, flat,
                   np.zeros(T, np.int64), stride, nrows, nb, F16_TABLE, X, np.arange(T, dtype=np.int64), o)
        else:
            _timed(par, T * nrows * rb, gather_parallel if par else gather_serial, ggml_type, flat,
                   np.zeros(T, np.int64), stride, nrows, nb, bs, F16_TABLE, X, np.arange(T, dtype=np.int64), o)
    elif T <= SMALL_T or (T <= INT8_MAX_T and _int8(R, ggml_type)):
        nbytes = nrows * rb
        par = R._par_ok(nbytes)
        if _int8(R, ggml_type):
            _timed(par, T * nbytes, _lit, mm_iq8_parallel if par else mm_iq8_serial,
                   ggml_type, flat, stride, nrows, nb, F16_TABLE, X, o)
        else:
            _timed(par, T * nbytes, multi_parallel if par else multi_serial,
                   ggml_type, flat, stride, nrows, nb, bs, F16_TABLE, X, o)
    else:
        # dequantize on the calling thread: a numba parallel region next to OpenBLAS calls costs
        # ms while BLAS threads spin (registry.matmul)
        tile_rows = max(1, min(nrows, _TILE_ELEMS // n_cols))
        tile = np.empty((tile_rows, n_cols), dtype=np.float32)
        for r0 in range(0, nrows, tile_rows):
            r1 = min(nrows, r0 + tile_rows)
            t = tile[: r1 - r0]
            pf, ps = R._flat(raw[r0:r1], rb)
            deq_rows_serial(ggml_type, pf, ps, r1 - r0, nb, F16_TABLE, t)
            if tile_rows == nrows:
                np.matmul(X, t.T, out=o)
            else:
                o[:, r0:r1] = X @ t.T
    if o is not out:
        out[:] = o
    return out


def gate_up(flat, goffs, uoffs, rstride: int, nrows: int, ggml_type: int, n_cols: int, X, xi, H):
    """registry.experts_gate_up: H[i] = silu(gate_i . X[xi[i]]) * (up_i . X[xi[i]]); gate and up
    rows in ONE parallel region, then ops.silu_mul, so H is bit-identical to the unfused
    gathered path (moe.RoutedExperts with DSD_UNFUSED_MOE=1)."""
    ggml_type = int(ggml_type)
    from dsd.shard import ops

    k = goffs.shape[0]
    GU = np.empty((2 * k, nrows), np.float32)
    offsets(flat, np.concatenate([goffs, uoffs]).astype(np.int64), rstride, nrows, ggml_type, n_cols, X,
            np.concatenate([xi, xi]).astype(np.int64), GU)
    H[:] = ops.silu_mul(GU[:k], GU[k:])
    return H


def down_sum(flat, doffs, rstride: int, nrows: int, ggml_type: int, n_cols: int, H, pair_lo, pair_hi, w, out):
    """registry.experts_down_sum: out[t] = sum_{p in lo[t]:hi[t]} w[p] * (down_p . H[p]), summed as
    the unfused path does (weights multiplied in, then np.sum over each token's run of pairs)."""
    ggml_type = int(ggml_type)
    P = doffs.shape[0]
    y = np.empty((P, nrows), np.float32)
    offsets(flat, np.ascontiguousarray(doffs, dtype=np.int64), rstride, nrows, ggml_type, n_cols, H,
            np.arange(P, dtype=np.int64), y)
    y *= w[:, None]
    for t in range(pair_lo.shape[0]):
        a, b = int(pair_lo[t]), int(pair_hi[t])
        if b > a:
            np.sum(y[a:b], axis=0, out=out[t])
        else:
            out[t] = 0
    return out


def warm_up(ggml_type: int) -> None:
    """Load every kernel specialisation these types use (serial and parallel) on zero blocks."""
    ggml_type = int(ggml_type)
    R = _reg()
    bs, ts = IQ_TYPES[ggml_type]
    cols = 2 * bs
    stack = np.zeros((2, 4, 2 * ts), np.uint8)
    flat, mst, rst = R.stack_view(stack)
    for par in (False, True):
        X = np.zeros((2, cols), np.float32)
        out = np.empty((2, 4), np.float32)
        (gather_parallel if par else gather_serial)(ggml_type, flat, np.zeros(2, np.int64), rst, 4, 2, bs,
                                                    F16_TABLE, X, np.zeros(2, np.int64), out)
        pf, ps = R._flat(stack[0], 2 * ts)
        (multi_parallel if par else multi_serial)(ggml_type, pf, ps, 4, 2, bs, F16_TABLE, X, out)
        (deq_rows_parallel if par else deq_rows_serial)(ggml_type, pf, ps, 4, 2, F16_TABLE,
                                                        np.empty((4, cols), np.float32))
        if _int8(R, ggml_type):
            _lit(mv_iq8_parallel if par else mv_iq8_serial, ggml_type, flat, np.zeros(2, np.int64), rst, 4, 2,
                 F16_TABLE, X, np.zeros(2, np.int64), out)
            _lit(mm_iq8_parallel if par else mm_iq8_serial, ggml_type, pf, ps, 4, 2, F16_TABLE, X, out)
