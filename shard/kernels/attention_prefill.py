"""Causal attention for a chunk of prompt tokens over a KV cache, fused and parallel.

Why: the numpy prompt path (ops.attention, attention.causal_attention) turns a float16 / bf16 /
q8_0 cache into a float32 copy of every key and value the chunk sees, per layer and per chunk,
and runs BLAS on it; with a long history (a chat's turn 10 prefilling 30 new tokens after 1,700
cached ones, a prefix-cache hit) that copy and the [g*n, L] score matrix are most of the step.
Here each work item reads the stored rows directly with the decode kernels' QK / PV pieces
(kernels/attention.py: each K/V chunk loaded once for up to 4 query rows, the vector exp).

Work items: (kv head j, block of tb consecutive query tokens); its R = g * nt query rows
(token-major: row r = t * g + i is token t0 + t, query head j * g + i) see keys 0 .. Lmax - 1,
Lmax = q_pos0 + t1.  Scores s [R, Lmax]; row r keeps keys < L_r = q_pos0 + t0 + t + 1 (its own
position) and its weights beyond L_r are set to 0, so the PV pass can run over Lmax for all
rows.  Per row the arithmetic is decode_serial's at length L_r: the same score products, the
max and the vector/scalar exp split over exactly L_r keys, the PV sum in the same position
order (the extra zero weights add +-0), the same 1 / total scaling.

Shapes: q [n, H, Dk] float32 C-order; k [Hkv, L, Dk], v [Hkv, L, Dv] as kernel_arrays() gives
them (float32, fp16 / bf16 bit patterns, q8_0 blocks), L = q_pos0 + n; out [n, H, Dv].
"""
import numpy as np
from numba import njit, prange

from .attention import _scores, _weighted_values, kernel_arrays, supported, vexp_sum

ROWS_PER_ITEM = 64   # query rows (heads x tokens) per work item: bounds s to [64, L] floats


@njit(cache=True, fastmath=True, parallel=True)
def prefill_kernel(q, k, v, scale, out, q_pos0, tb):
    """out[t, h] = softmax over keys l <= q_pos0 + t of scale * q[t, h] . k[h // g, l], applied
    to v[h // g]; work items (kv head, tb query tokens) in parallel (module docstring)."""
    n, H, Dk = q.shape
    Hkv = k.shape[0]
    Dv = out.shape[2]
    g = H // Hkv
    ks0, ks1 = k.strides[0] // k.itemsize, k.strides[1] // k.itemsize
    vs0, vs1 = v.strides[0] // v.itemsize, v.strides[1] // v.itemsize
    nb = (n + tb - 1) // tb
    for it in prange(Hkv * nb):
        j = it // nb
        t0 = (it - j * nb) * tb
        nt = min(n, t0 + tb) - t0
        R = g * nt
        Lmax = q_pos0 + t0 + nt
        qs = np.empty((R, Dk), np.float32)
        for t in range(nt):
            for i in range(g):
                for d in range(Dk):
                    qs[t * g + i, d] = q[t0 + t, j * g + i, d]
        s = np.empty((R, Lmax), np.float32)
        _scores(k, qs, 0, s, j * ks0, ks1, Lmax, R, Dk, scale)
        tot = np.empty(R, np.float32)
        for r in range(R):   # unnormalised softmax over the row's own keys, zeros after them
            Lr = q_pos0 + t0 + r // g + 1
            m = s[r, 0]
            for l in range(1, Lr):
                m = max(m, s[r, l])
            tr = vexp_sum(s, r * Lmax, Lr, m)
            for l in range(Lr - Lr % 16, Lr):
                e = np.exp(s[r, l] - m)
                s[r, l] = e
                tr += e
            for l in range(Lr, Lmax):
                s[r, l] = 0.0
            tot[r] = tr
        os_ = np.zeros((R, Dv), np.float32)
        _weighted_values(v, s, os_, 0, j * vs0, vs1, Lmax, R, Dv)
        for r in range(R):
            inv = np.float32(1.0) / tot[r]
            t, i = r // g, r % g
            for d in range(Dv):
                out[t0 + t, j * g + i, d] = os_[r, d] * inv


def tokens_per_item(g: int) -> int:
    """Query tokens per work item: ROWS_PER_ITEM // g (at least 1, at most 16)."""
    return max(1, min(16, ROWS_PER_ITEM // max(g, 1)))


def prefill_supported(q: np.ndarray, k, v, q_pos0: int) -> bool:
    """q [n, H, Dk] float32 whose keys are exactly the cache's L = q_pos0 + n positions, with
    shapes the decode kernels take (attention.supported)."""
    return (isinstance(q, np.ndarray) and q.ndim == 3 and q.shape[0] >= 1 and k.ndim == 3
            and k.shape[1] == q_pos0 + q.shape[0] and supported(q[0], k, v))


def prefill(q: np.ndarray, k, v, q_pos0: int, scale: float) -> np.ndarray:
    """Causal attention of q [n, H, Dk] (positions q_pos0 .. q_pos0+n-1) over k [Hkv, L, Dk],
    v [Hkv, L, Dv] (float32, float16, or a bf16 / q8_0 cache's KVRows, read as stored) ->
    [n, H, Dv] float32.  Check prefill_supported() first."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    n, H, _ = q.shape
    out = np.empty((n, H, v.shape[2]), np.float32)
    ka, va = kernel_arrays(k, v)
    from . import stats

    tb = tokens_per_item(H // ka.shape[0])
    if stats.enabled:
        stats.timed("attention_prefill", prefill_kernel, q, ka, va, np.float32(scale), out, q_pos0, tb)
    else:
        prefill_kernel(q, ka, va, np.float32(scale), out, q_pos0, tb)
    return out
