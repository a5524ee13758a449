"""Products over stacks of same-shaped matrices in one kernel call: a token's chosen experts
(matvec_gather), row chunks of several matrices in one buffer (matvec_offsets: llama's q / k / v,
MLA's q_a and kv_a), and a decode step's routed experts fused (experts_gate_up, experts_down_sum:
kernels/experts.py).  One parallel region instead of one per matrix (each costs ~5-10 us here).
Conventions as registry.py's (which re-exports these names): stack uint8 [E, rows, row_bytes]
with contiguous rows; flat = a read-only 1-D uint8 view of the buffer, matrices addressed by byte
offsets; X float32 C-contiguous [n, cols].
"""
from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dsd.errors import GGUFError

from ._common import F16_TABLE
from . import drivers as dv
from . import products_iq as _piq
from .registry import (_IQ, QUANT_TYPES, _entry, _int8_products, _int8_rows, _note, _par_ok, _perm, matvec,
                       quant_type)


def stack_view(stack: np.ndarray):
    """-> (read-only 1-D uint8 view over a stack [E, rows, row_bytes], matrix stride, row
    stride): what matvec_gather needs; callers that gather from one stack often cache it."""
    if stack.dtype != np.uint8 or stack.ndim != 3 or stack.strides[2] != 1:
        raise GGUFError(f"stack must be a 3-D uint8 array with contiguous rows, got {stack.dtype} "
                        f"{stack.shape} strides {stack.strides}")
    E, nrows, rb = stack.shape
    mstride, rstride = stack.strides[0], stack.strides[1]
    extent = (E - 1) * mstride + (nrows - 1) * rstride + rb
    flat = as_strided(stack, shape=(max(extent, 0),), strides=(1,))
    flat.flags.writeable = False
    return flat, mstride, rstride


def matvec_gather(stack: np.ndarray, ggml_type: int, ids, X: np.ndarray, xi=None,
                  out: np.ndarray | None = None, view=None) -> np.ndarray:
    """out[i] = W[ids[i]] @ X[xi[i]] for a stack of same-shaped matrices in one kernel call.

    stack: uint8 [E, rows, row_bytes] raw blocks (inner dim contiguous; any uniform row and matrix
    strides, so row ranges and block-aligned column slices of expert stacks work); ids int [k];
    X float32 [n, cols]; xi int [k] (default: arange(k) when n == k, zeros when n == 1);
    -> out float32 [k, rows].  Used for a token's chosen experts and MLA's per-head products:
    one parallel region instead of one per matrix (each costs ~5-10 us here).
    view: stack_view(stack), if the caller keeps it."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    flat, mstride, rstride = view if view is not None else stack_view(stack)
    E, nrows, rb = stack.shape
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    k = ids.shape[0]
    X = np.asarray(X)
    if X.dtype != np.float32 or not X.flags.c_contiguous or X.ndim != 2:
        X = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, X.shape[-1])
    if xi is None:
        if X.shape[0] not in (1, k):
            raise GGUFError(f"X has {X.shape[0]} rows; pass xi or give 1 or {k} rows")
        xi = np.zeros(k, np.int64) if X.shape[0] == 1 and k != 1 else np.arange(k, dtype=np.int64)
    else:
        xi = np.asarray(xi, dtype=np.int64).reshape(-1)
    if out is None:
        out = np.empty((k, nrows), dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (k, nrows) or not out.flags.c_contiguous:
        raise GGUFError(f"out must be a contiguous float32 array of shape ({k}, {nrows})")
    if k == 0 or nrows == 0:
        return out
    if ids.min() < 0 or ids.max() >= E or xi.min() < 0 or xi.max() >= X.shape[0] or xi.shape[0] != k:
        raise GGUFError(f"matrix ids must lie in [0, {E}) and xi in [0, {X.shape[0]}), one per id")
    n_cols = rb // qt.type_size * qt.block_size
    if rb % qt.type_size or X.shape[1] != n_cols:
        raise GGUFError(f"X has {X.shape[1]} columns, the {qt.name} matrices {n_cols}")
    if qt.ggml_type in _IQ:
        return _piq.gather(stack, qt.ggml_type, flat, mstride, rstride, ids, X, xi, out)
    nb = n_cols // qt.simd_bs
    if nb * qt.simd_bs < n_cols:  # float-type tail columns: per-matrix kernels handle them
        for i in range(k):
            matvec(stack[ids[i]], ggml_type, X[xi[i]], out[i])
        return out
    _offset_products(qt, flat, ids * mstride, rstride, nrows, nb, X, xi, out)
    return out


def has_simd_rows(ggml_type: int, n_cols: int) -> bool:
    """True when rows of n_cols elements are whole SIMD blocks of the type (no float-type tail
    columns), i.e. matvec_offsets can compute them."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    return n_cols % qt.simd_bs == 0


def matvec_offsets(flat: np.ndarray, offs: np.ndarray, rstride: int, nrows: int, ggml_type: int,
                   n_cols: int, X: np.ndarray, xi: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i, r] = (row r of the matrix at byte flat[offs[i]]) . X[xi[i]]: the core of matvec_gather
    for callers that prepared everything once (weights.FusedLinear: several matrices in one
    buffer, cut into equal row chunks, computed in one parallel region).  No validation: flat is
    a read-only 1-D uint8 view, offs / xi int64 [k], X float32 C-contiguous [n, n_cols],
    out float32 C-contiguous [k, nrows], and has_simd_rows(ggml_type, n_cols)."""
    if ggml_type in _IQ:
        return _piq.offsets(flat, offs, rstride, nrows, ggml_type, n_cols, X, xi, out)
    qt = QUANT_TYPES[ggml_type]
    _offset_products(qt, flat, offs, rstride, nrows, n_cols // qt.simd_bs, X, xi, out)
    return out


def experts_gate_up(flat, goffs, uoffs, rstride: int, nrows: int, ggml_type: int, n_cols: int,
                    X: np.ndarray, xi: np.ndarray, H: np.ndarray) -> np.ndarray:
    """H[i, r] = silu(gate_i[r] . X[xi[i]]) * (up_i[r] . X[xi[i]]) in one parallel region, gate_i /
    up_i the matrices at byte flat[goffs[i]] / flat[uoffs[i]] (kernels/experts.py).  Prepared
    arguments as for matvec_offsets; H float32 C-contiguous [len(goffs), nrows]."""
    from . import experts as ex

    if ggml_type in _IQ:
        return _piq.gate_up(flat, goffs, uoffs, rstride, nrows, ggml_type, n_cols, X, xi, H)
    qt = QUANT_TYPES[ggml_type]
    nb = n_cols // qt.simd_bs
    if _int8_rows(ggml_type, nb):
        _entry(ex.gate_up_i8, ggml_type, (type(flat), X.flags.writeable),
               flat, goffs, uoffs, rstride, nrows, nb, F16_TABLE, X, xi, H)
    else:
        _entry(ex.gate_up_float, ggml_type, (type(flat), X.flags.writeable), flat, goffs, uoffs, rstride,
               nrows, nb, qt.gsz, F16_TABLE, *_perm(ggml_type, nb, qt.simd_bs), X, xi, H)
    return H


def experts_down_sum(flat, doffs, rstride: int, nrows: int, ggml_type: int, n_cols: int, H: np.ndarray,
                     pair_lo: np.ndarray, pair_hi: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[t, r] = sum_{p in pair_lo[t]:pair_hi[t]} w[p] * (down_p[r] . H[p]) in one parallel region
    (kernels/experts.py); out float32 C-contiguous [len(pair_lo), nrows]."""
    from . import experts as ex

    if ggml_type in _IQ:
        return _piq.down_sum(flat, doffs, rstride, nrows, ggml_type, n_cols, H, pair_lo, pair_hi, w, out)
    qt = QUANT_TYPES[ggml_type]
    nb = n_cols // qt.simd_bs
    if _int8_rows(ggml_type, nb):
        _entry(ex.down_sum_i8, ggml_type, (type(flat), H.flags.writeable),
               flat, doffs, rstride, nrows, nb, F16_TABLE, H, pair_lo, pair_hi, w, out)
    else:
        _entry(ex.down_sum_float, ggml_type, (type(flat), H.flags.writeable), flat, doffs, rstride, nrows,
               nb, qt.gsz, F16_TABLE, *_perm(ggml_type, nb, qt.simd_bs), H, pair_lo, pair_hi, w, out)
    return out


def _offset_products(qt, flat, offs, rstride, nrows, nb, X, xi, out) -> None:
    nbytes = offs.shape[0] * nrows * nb * qt.simd_ts
    if _int8_rows(qt.ggml_type, nb):
        _int8_products(flat, offs, rstride, nrows, nb, X, xi, out, nbytes, qt.ggml_type)
        return
    par = _par_ok(nbytes)
    t0 = time.perf_counter()
    _entry(dv.mv_gather_parallel if par else dv.mv_gather_serial, qt.ggml_type, type(flat), flat, offs,
           rstride, nrows, nb, qt.gsz, F16_TABLE, *_perm(qt.ggml_type, nb, qt.simd_bs), X, xi, out)
    _note(par, nbytes, time.perf_counter() - t0)
