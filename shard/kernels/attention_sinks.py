"""Decode attention with gpt-oss's attention sinks: one learned logit per query head that joins
the softmax's denominator only (softmax over [scores, sink], the sink's column dropped).  The
per-head scores and PV sums are attention.py's kernels (_head_partial); only the final
normalisation differs.  Shapes as attention.decode: q [H, Dk], k [Hkv, L, Dk], v [Hkv, L, Dv],
sinks float32 [H], out [H, Dv].
"""
import numpy as np
from numba import njit, prange

from .attention import SPLIT_MIN_BYTES, _head_partial, kernel_arrays, n_splits


@njit(cache=True, fastmath=True)
def decode_serial_sinks(q, k, v, scale, sinks, out):
    """decode_serial with a sink logit per query head in each softmax denominator:
    out_h = sum_l e^(s_l - M) v_l / (sum_l e^(s_l - M) + e^(sink_h - M)), M = max(max_l s_l, sink_h)
    (the max includes the sink, so no exponent overflows whatever the sink's size)."""
    Hkv, L = k.shape[0], k.shape[1]
    g = q.shape[0] // Hkv
    Dv = out.shape[1]
    s = np.empty((g, L), np.float32)
    mx = np.empty(g, np.float32)
    tot = np.empty(g, np.float32)
    out[:, :] = 0.0
    for j in range(Hkv):
        _head_partial(q, k, v, scale, out, j, g, s, mx, tot)
        for i in range(g):
            h = j * g + i
            M = max(mx[i], sinks[h])
            f = np.exp(mx[i] - M)
            inv = f / (tot[i] * f + np.exp(sinks[h] - M))
            for d in range(Dv):
                out[h, d] *= inv


@njit(cache=True, fastmath=True, parallel=True)
def decode_split_sinks(q, k, v, scale, sinks, out, nsplit):
    """decode_split with the sinks of decode_serial_sinks: the sink joins the log-sum-exp
    combine as one more term, e^(sink_h - M), of the denominator."""
    Hkv, L = k.shape[0], k.shape[1]
    H, Dv = q.shape[0], out.shape[1]
    g = H // Hkv
    po = np.zeros((nsplit, H, Dv), np.float32)
    pm = np.full((nsplit, H), -np.inf, np.float32)
    pt = np.zeros((nsplit, H), np.float32)
    for it in prange(Hkv * nsplit):
        j = it // nsplit
        c = it - j * nsplit
        a = c * L // nsplit
        b = (c + 1) * L // nsplit
        if b > a:
            s = np.empty((g, b - a), np.float32)
            mx = np.empty(g, np.float32)
            tot = np.empty(g, np.float32)
            _head_partial(q, k[:, a:b], v[:, a:b], scale, po[c], j, g, s, mx, tot)
            for i in range(g):
                pm[c, j * g + i] = mx[i]
                pt[c, j * g + i] = tot[i]
    for h in range(H):
        M = sinks[h]
        for c in range(nsplit):
            if pt[c, h] > 0:
                M = max(M, pm[c, h])
        den = np.exp(sinks[h] - M)
        for d in range(Dv):
            out[h, d] = 0
        for c in range(nsplit):
            if pt[c, h] > 0:
                f = np.exp(pm[c, h] - M)
                den += f * pt[c, h]
                for d in range(Dv):
                    out[h, d] += f * po[c, h, d]
        inv = np.float32(1.0) / den
        for d in range(Dv):
            out[h, d] *= inv


def decode_sinks(q, k, v, scale, sinks):
    """attention.decode with sinks [H]: the split kernel past the same size as the plain one."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((q.shape[0], v.shape[2]), np.float32)
    k, v = kernel_arrays(k, v)
    import numba

    from . import stats

    nsplit = n_splits(k.shape[0], k.shape[1], numba.get_num_threads())
    if k.shape[0] * k.shape[1] * (k.shape[2] + v.shape[2]) * k.itemsize < SPLIT_MIN_BYTES:
        nsplit = 0  # as decode(): a function of the shapes only
    sc = np.float32(scale)
    if nsplit:
        args = (q, k, v, sc, sinks, out, nsplit)
        stats.timed("attention_decode_split_sinks", decode_split_sinks, *args) if stats.enabled \
            else decode_split_sinks(*args)
    else:
        args = (q, k, v, sc, sinks, out)
        stats.timed("attention_decode_serial_sinks", decode_serial_sinks, *args) if stats.enabled \
            else decode_serial_sinks(*args)
    return out
