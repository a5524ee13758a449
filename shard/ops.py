"""Numeric building blocks shared by every architecture (float32 activations).

Model files call these and `dsd.shard.weights` objects; they never touch quantized bytes.
Shapes: T = tokens in the batch, D = hidden size, H = query heads, Hkv = key/value heads,
Dh = head dim, L = cached positions.
"""
from __future__ import annotations

import math

import numpy as np

from dsd.shard.kernels import attention as attn_kernels
from dsd.shard.kernels.attention_prefill import prefill, prefill_supported
from dsd.shard.kernels import batch_invariant_mode  # noqa: F401  (also for moe.py)
from dsd.shard.kernels import stats as kernel_stats
from dsd.shard.kernels.elementwise import rms_norm_rows, rope_rows


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] float32 -> x / rms(x) * weight (computed in float32 like llama.cpp)."""
    if x.dtype == np.float32 and weight.dtype == np.float32:
        # every float32 input through the same row kernel (a column slice or a 1-D decode row is
        # copied first): a row's norm must not depend on how it reached here (batch invariance)
        x = np.ascontiguousarray(x)
        rows = x.reshape(-1, x.shape[-1])  # per-head norms: [T, H, Dh] -> [T*H, Dh]
        if kernel_stats.enabled:
            return kernel_stats.timed("rms_norm_rows", rms_norm_rows, rows, weight, np.float32(eps),
                                      np.empty_like(rows)).reshape(x.shape)
        return rms_norm_rows(rows, weight, np.float32(eps), np.empty_like(rows)).reshape(x.shape)
    return rms_norm_numpy(x, weight, eps)


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("...i,...i->...", x, x, dtype=np.float32) / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps)))[..., None].astype(np.float32) * weight


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU activation: silu(gate) * up = gate * up / (1 + exp(-gate)), float32, few temporaries."""
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along `axis`, computed in place when x is a temporary we own."""
    m = x.max(axis=axis, keepdims=True)
    e = np.subtract(x, m)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


class RopeTable:
    """Precomputed cos/sin for rotary position embedding.

    style "norm": rotates adjacent pairs (x[2i], x[2i+1])  -- llama.cpp LLAMA_ROPE_TYPE_NORM
                  (GGUF llama files store q/k permuted for this).
    style "neox": rotates halves (x[i], x[i + n/2])        -- Qwen2/3, GPT-NeoX.
    `freqs` may be overridden (YaRN / llama3 scaling) and `mscale` multiplies cos and sin.
    """

    def __init__(self, n_rot: int, base: float, style: str = "norm", max_pos: int = 4096,
                 freqs: np.ndarray | None = None, mscale: float = 1.0):
        if style not in ("norm", "neox"):
            raise ValueError(f"unknown rope style {style!r}")
        self.n_rot, self.style = n_rot, style
        if freqs is None:
            freqs = 1.0 / (base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot))
        self.freqs = np.asarray(freqs, dtype=np.float64)  # [n_rot/2]
        self.mscale = mscale
        self._grow(max_pos)

    def _grow(self, n: int) -> None:
        ang = np.arange(n, dtype=np.float64)[:, None] * self.freqs[None, :]  # [n, n_rot/2]
        self.cos = (np.cos(ang) * self.mscale).astype(np.float32)
        self.sin = (np.sin(ang) * self.mscale).astype(np.float32)

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [T, heads, Dh] (only the first n_rot dims rotate) -> rotated copy."""
        self._ensure(positions)
        if x.dtype == np.float32:
            # always the row kernel (strided views copied first), so that a row's rotation does
            # not depend on whether its batch's view happened to be contiguous (batch invariance)
            x = np.ascontiguousarray(x)
            args = (x, self.cos, self.sin, positions, self.n_rot, self.style == "neox", np.empty_like(x))
            return kernel_stats.timed("rope_rows", rope_rows, *args) if kernel_stats.enabled else rope_rows(*args)
        return self.apply_numpy(x, positions)

    def _ensure(self, positions: np.ndarray) -> None:
        if positions.size and int(positions.max()) >= self.cos.shape[0]:
            self._grow(max(int(positions.max()) + 1, 2 * self.cos.shape[0]))

    def apply_numpy(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self._ensure(positions)
        c = self.cos[positions][:, None, :]  # [T, 1, n_rot/2]
        s = self.sin[positions][:, None, :]
        out = x.copy()
        r = self.n_rot
        if self.style == "norm":
            x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
            out[..., 0:r:2] = x0 * c - x1 * s
            out[..., 1:r:2] = x0 * s + x1 * c
        else:
            h = r // 2
            x0, x1 = x[..., :h], x[..., h:r]
            out[..., :h] = x0 * c - x1 * s
            out[..., h:r] = x0 * s + x1 * c
        return out


ATTN_CHUNK = 128  # query rows per block in long prefills


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, scale: float) -> np.ndarray:
    """Causal grouped-query attention for one sequence.

    q [n, H, Dh] for positions q_pos0 .. q_pos0+n-1; k [Hkv, L, Dk], v [Hkv, L, Dv] (heads first,
    as SequenceCache stores them) hold positions 0 .. L-1 (L = q_pos0 + n). Returns [n, H, Dv].
    Query head h uses kv head h // (H // Hkv).
    """
    n, H, _ = q.shape
    Hkv, L, _ = k.shape
    g = H // Hkv
    if n > 1 and batch_invariant_mode():
        # batch invariance: every query as the decode step at its position computes it (the
        # prompt path's BLAS products block by the chunk's shape, so a prompt's tokens would
        # otherwise differ from the same tokens decoded one at a time or chunked differently)
        out = np.empty((n, H, v.shape[-1]), dtype=np.float32)
        for i in range(n):
            end = q_pos0 + i + 1
            out[i] = attention(q[i:i + 1], k[:, :end], v[:, :end], q_pos0 + i, scale)[0]
        return out
    if n == 1 and attn_kernels.supported(q[0], k, v):
        # decode: fused SIMD kernel (kernels/attention.py), ~3x faster than the matmul path
        return attn_kernels.decode(q[0], k, v, scale)[None]
    if prefill_supported(q, k, v, q_pos0):
        # a prompt chunk: the fused parallel kernel over the stored cache rows (no float32 copy
        # of a float16 cache, no [g*n, L] score matrix through BLAS; kernels/attention_prefill.py)
        return prefill(q, k, v, q_pos0, scale)
    if n > ATTN_CHUNK:
        # Long prefill: query chunks only read the keys they can see (skips the masked half of
        # the score matrix and bounds its size to [Hkv, g*ATTN_CHUNK, L]).
        out = np.empty((n, H, v.shape[-1]), dtype=np.float32)
        for i0 in range(0, n, ATTN_CHUNK):
            i1 = min(n, i0 + ATTN_CHUNK)
            end = q_pos0 + i1
            out[i0:i1] = attention(q[i0:i1], k[:, :end], v[:, :end], q_pos0 + i0, scale)
        return out
    if k.dtype != np.float32:  # float16 KV cache (kv_cache.py): matmul in float32
        k = k.astype(np.float32)
    if v.dtype != np.float32:
        v = v.astype(np.float32)
    # [Hkv, g*n, Dh] so each kv head is one batched matmul over its query group; k's last two
    # axes are contiguous, so the transposed view goes to BLAS without a copy.
    qg = q.reshape(n, Hkv, g, -1).transpose(1, 2, 0, 3).reshape(Hkv, g * n, -1)
    scores = np.matmul(qg, k.transpose(0, 2, 1))  # [Hkv, g*n, L]
    scores *= np.float32(scale)
    if n > 1:
        # query i (absolute q_pos0+i) sees keys 0..q_pos0+i: add -inf above the diagonal
        bias = np.where(np.arange(L)[None, :] <= (q_pos0 + np.arange(n))[:, None],
                        np.float32(0.0), np.float32(-np.inf))  # [n, L]
        scores.reshape(Hkv, g, n, L)[...] += bias
    p = softmax(scores)
    out = np.matmul(p, v)  # [Hkv, g*n, Dv]
    return out.reshape(Hkv, g, n, -1).transpose(2, 0, 1, 3).reshape(n, H, -1)


def default_attn_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
