"""Fallback matvec for any registered type: dequantize one block into a float32 scratch and
dot it with x (float64-free, float32 accumulation per block, float32 row sum).

Slower than the dedicated kernels (~3-5x), used for types without one and as a test oracle
for the loop-shape kernels.
"""
import numpy as np
from numba import njit, prange

from .dequant import (deq_bf16, deq_f16, deq_f32, deq_q2_k, deq_q3_k, deq_q4_0, deq_q4_1,
                      deq_q4_k, deq_q5_0, deq_q5_1, deq_q5_k, deq_q6_k, deq_q8_0)

GROUP = 16  # rows per parallel work item (one scratch allocation per item)


@njit(cache=True, inline="always")
def _deq_block(kind, flat, o, tab, dst):
    if kind == 2:
        deq_q4_0(flat, o, tab, dst, 0)
    elif kind == 3:
        deq_q4_1(flat, o, tab, dst, 0)
    elif kind == 6:
        deq_q5_0(flat, o, tab, dst, 0)
    elif kind == 7:
        deq_q5_1(flat, o, tab, dst, 0)
    elif kind == 8:
        deq_q8_0(flat, o, tab, dst, 0)
    elif kind == 10:
        deq_q2_k(flat, o, tab, dst, 0)
    elif kind == 11:
        deq_q3_k(flat, o, tab, dst, 0)
    elif kind == 12:
        deq_q4_k(flat, o, tab, dst, 0)
    elif kind == 13:
        deq_q5_k(flat, o, tab, dst, 0)
    elif kind == 14:
        deq_q6_k(flat, o, tab, dst, 0)
    elif kind == 1:
        deq_f16(flat, o, tab, dst, 0)
    elif kind == 30:
        deq_bf16(flat, o, tab, dst, 0)
    elif kind == 0:
        deq_f32(flat, o, tab, dst, 0)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_generic(kind, flat, stride, nrows, ncols, bs, ts, tab, x, out):
    """out[r] = sum_c W[r, c] * x[c] with W given as raw blocks (row r at flat[r*stride:])."""
    nb = ncols // bs
    ngroups = (nrows + GROUP - 1) // GROUP
    for g in prange(ngroups):
        scratch = np.empty(bs, dtype=np.float32)
        for r in range(g * GROUP, min(nrows, (g + 1) * GROUP)):
            acc = np.float32(0.0)
            for b in range(nb):
                _deq_block(kind, flat, r * stride + b * ts, tab, scratch)
                s = np.float32(0.0)
                for j in range(bs):
                    s += scratch[j] * x[b * bs + j]
                acc += s
            out[r] = acc
