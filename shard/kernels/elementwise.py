"""Small fused row operations for the decode path (RMSNorm, RoPE).

At one token per step each numpy call costs a few µs of dispatch for ~1 µs of arithmetic;
these fuse the 4-6 numpy calls of each operation into one compiled loop.  The numpy versions
in dsd.shard.ops remain the reference (tests compare the two).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def rms_norm_rows(x, w, eps, out):
    """x [T, D] float32 C-order; w [D]; out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.float32(math.sqrt(ss / D + eps))
        for i in range(D):
            out[t, i] = x[t, i] * r * w[i]
    return out


@njit(cache=True, fastmath=True)
def rope_rows(x, cos, sin, positions, n_rot, neox, out):
    """x [T, H, Dh]; cos/sin [max_pos, n_rot/2]; rotate the first n_rot dims of every head.

    neox=False: pairs (2i, 2i+1) (llama.cpp NORM); neox=True: pairs (i, i + n_rot/2).
    """
    T, H, Dh = x.shape
    half = n_rot // 2
    for t in range(T):
        p = positions[t]
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if neox:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    out[t, h, i] = a * c - b * s
                    out[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    out[t, h, 2 * i] = a * c - b * s
                    out[t, h, 2 * i + 1] = a * s + b * c
            for i in range(n_rot, Dh):
                out[t, h, i] = x[t, h, i]
    return out
