"""Registry of supported GGML types and the public entry points (dequantize, matvec, matmul).

Conventions (see DESIGN.md): a weight W of shape (rows, n_cols) is given as its raw GGUF bytes,
a uint8 array (rows, row_bytes) whose inner dimension is contiguous; its row stride may be
larger than row_bytes (a column slice raw[:, c0:c1] of a wider matrix at block boundaries), and
it may be a read-only np.memmap. Kernels see it as a 1-D read-only uint8 array `flat` with row r
starting at flat[r * stride], so one compiled specialisation serves every case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided
from gguf import GGMLQuantizationType as G

from dsd.errors import GGUFError

from ._common import F16_TABLE
from . import dequant as dq
from . import matvec_fast as mv
from .generic import matvec_generic


@dataclass(frozen=True)
class QuantType:
    ggml_type: int          # gguf.GGMLQuantizationType value
    name: str
    block_size: int         # elements per block
    type_size: int          # bytes per block
    dequant_block: Callable  # numba fn (flat, o, f16tab, dst, d0): one block -> dst[d0:d0+bs]
    # matvec kernels (flat, stride, nrows, ncols, f16tab, x, out) -> None; serial for small
    # matrices, parallel (prange) above PAR_MIN_BYTES
    matvec_serial: Callable = field(default=None, repr=False)
    matvec_parallel: Callable = field(default=None, repr=False)
    # float types are read through a typed view of the bytes (float32 / uint16); None = uint8
    elem_dtype: object = None

    def row_bytes(self, n_cols: int) -> int:
        return row_bytes(self.ggml_type, n_cols)


QUANT_TYPES: dict[int, QuantType] = {}

# Matrices smaller than this many bytes run single-threaded: the numba/OpenMP parallel-region
# launch (~10-30 us on the 2-core VM, more when it is busy) exceeds the work (192x576 Q4_1 is
# 69 KB = ~10 us on one core). Measured in bench/kernels_bench.py.
PAR_MIN_BYTES = 256 * 1024


def _generic_launcher(kind, bs, ts):
    def launch(flat, stride, nrows, ncols, tab, x, out):
        matvec_generic(kind, flat, stride, nrows, ncols, bs, ts, tab, x, out)
    return launch


def _register(gt: G, dequant_block, serial=None, parallel=None, elem_dtype=None):
    """Adding a type = one call here (plus its numba functions)."""
    from gguf.constants import GGML_QUANT_SIZES
    bs, ts = GGML_QUANT_SIZES[gt]
    kind = int(gt)
    if parallel is None:
        parallel = _generic_launcher(kind, bs, ts)
    QUANT_TYPES[kind] = QuantType(kind, gt.name, bs, ts, dequant_block, serial or parallel,
                                  parallel, elem_dtype)


_register(G.F32, dq.deq_f32, None, mv.p_f32, np.float32)
_register(G.F16, dq.deq_f16, None, mv.p_f16, np.uint16)
_register(G.BF16, dq.deq_bf16, None, mv.p_bf16, np.uint16)
_register(G.Q4_0, dq.deq_q4_0, mv.s_q4_0, mv.p_q4_0)
_register(G.Q4_1, dq.deq_q4_1, mv.s_q4_1, mv.p_q4_1)
_register(G.Q5_0, dq.deq_q5_0, mv.s_q5_0, mv.p_q5_0)
_register(G.Q5_1, dq.deq_q5_1, mv.s_q5_1, mv.p_q5_1)
_register(G.Q8_0, dq.deq_q8_0, mv.s_q8_0, mv.p_q8_0)
_register(G.Q2_K, dq.deq_q2_k)
_register(G.Q3_K, dq.deq_q3_k)
_register(G.Q4_K, dq.deq_q4_k, mv.s_q4_k, mv.p_q4_k)
_register(G.Q5_K, dq.deq_q5_k, mv.s_q5_k, mv.p_q5_k)
_register(G.Q6_K, dq.deq_q6_k, mv.s_q6_k, mv.p_q6_k)


def quant_type(ggml_type: int) -> QuantType:
    qt = QUANT_TYPES.get(ggml_type)
    if qt is None:
        try:
            name = G(ggml_type).name
        except ValueError:
            name = f"unknown type id {ggml_type}"
        supported = ", ".join(q.name for q in QUANT_TYPES.values())
        raise GGUFError(f"GGML tensor type {name} ({ggml_type}) is not supported by dsd kernels; "
                        f"supported: {supported}. Re-quantize the model to one of these "
                        f"(e.g. llama-quantize ... Q4_K_M).")
    return qt


def row_bytes(ggml_type: int, n_cols: int) -> int:
    qt = quant_type(ggml_type)
    if n_cols <= 0 or n_cols % qt.block_size:
        raise GGUFError(f"row of {n_cols} elements is not a positive multiple of the {qt.name} "
                        f"block size {qt.block_size}; such a tensor cannot be stored as {qt.name}")
    return n_cols // qt.block_size * qt.type_size


def _flat(raw: np.ndarray, rb: int):
    """raw uint8 (rows, rb), inner dim contiguous -> (read-only 1-D uint8 view, row stride)."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise GGUFError(f"raw weights must be a 2-D uint8 array of block bytes, got "
                        f"{raw.dtype} with shape {raw.shape}")
    if raw.shape[1] != rb:
        raise GGUFError(f"raw weights have {raw.shape[1]} bytes per row, expected {rb} "
                        f"for this type and column count")
    if raw.flags.c_contiguous:
        flat = raw.reshape(-1)
        stride = rb
    else:
        stride, s1 = raw.strides
        if s1 != 1 or stride < rb:
            raise GGUFError(f"raw weights must have contiguous rows (strides {raw.strides}); "
                            f"pass a row-major view or np.ascontiguousarray(raw)")
        flat = as_strided(raw, shape=((raw.shape[0] - 1) * stride + rb,), strides=(1,))
    if flat.flags.writeable:
        flat.flags.writeable = False  # one numba specialisation for memmaps and arrays
    return flat, stride


def _ncols(qt: QuantType, rb: int) -> int:
    return rb // qt.type_size * qt.block_size


def dequantize(raw: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """raw (rows, row_bytes) uint8 -> float32 (rows, n_cols), bit-exact with gguf-py."""
    qt = quant_type(ggml_type)
    rb = row_bytes(ggml_type, n_cols)
    flat, stride = _flat(raw, rb)
    out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
    if raw.shape[0]:
        dq.dequant_rows(qt.ggml_type, flat, stride, raw.shape[0], n_cols, qt.block_size,
                        qt.type_size, F16_TABLE, out)
    return out


def _vec(x, n_cols, what="x"):
    if x.dtype != np.float32 or x.ndim != 1 or x.shape[0] != n_cols or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] != n_cols:
            raise GGUFError(f"{what} has shape {x.shape}, expected ({n_cols},)")
    return x


def matvec(raw: np.ndarray, ggml_type: int, x: np.ndarray, out: np.ndarray | None = None):
    """W @ x for W given as raw blocks (rows, row_bytes); x float32 (n_cols,) -> (rows,)."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    rb = raw.shape[1] if raw.ndim == 2 else -1
    n_cols = rb // qt.type_size * qt.block_size
    flat, stride = _flat(raw, rb if rb % qt.type_size == 0 else -1)
    x = _vec(x, n_cols)
    nrows = raw.shape[0]
    if out is None:
        out = np.empty(nrows, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (nrows,) or not out.flags.c_contiguous:
        raise GGUFError(f"out must be a contiguous float32 array of shape ({nrows},)")
    if nrows:
        kern = qt.matvec_parallel if nrows * rb >= PAR_MIN_BYTES else qt.matvec_serial
        if qt.elem_dtype is not None:
            flat = flat.view(qt.elem_dtype)
            stride //= flat.itemsize
        kern(flat, stride, nrows, n_cols, F16_TABLE, x, out)
    return out


# Rows dequantized per BLAS call in matmul: 8 MiB of float32 tile (fits L3 with X) at 1024 cols.
_TILE_ELEMS = 2 * 1024 * 1024


def matmul(raw: np.ndarray, ggml_type: int, X: np.ndarray, out: np.ndarray | None = None):
    """X @ W.T for X float32 (T, n_cols), W raw blocks (rows, row_bytes) -> float32 (T, rows).

    Prefill path: dequantize tiles of rows to float32 (bit-exact) and let numpy's sgemm do the
    T x rows x n_cols product, so the cost is one dequant pass plus near-BLAS speed."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    rb = raw.shape[1] if raw.ndim == 2 else -1
    n_cols = rb // qt.type_size * qt.block_size
    flat, stride = _flat(raw, rb if rb % qt.type_size == 0 else -1)
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
    tile_rows = max(1, min(nrows, _TILE_ELEMS // n_cols))
    tile = np.empty((tile_rows, n_cols), dtype=np.float32)
    for r0 in range(0, nrows, tile_rows):
        r1 = min(nrows, r0 + tile_rows)
        t = tile[: r1 - r0]
        dq.dequant_rows(qt.ggml_type, flat[r0 * stride:], stride, r1 - r0, n_cols,
                        qt.block_size, qt.type_size, F16_TABLE, t)
        if r1 - r0 == nrows:
            np.matmul(X, t.T, out=out)
        else:
            out[:, r0:r1] = X @ t.T
    return out
