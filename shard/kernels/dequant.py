"""Dequantization of raw GGUF block bytes to float32, bit-exact with gguf.quants.dequantize.

Bit-exactness means the same float32 operations in the same order as gguf-py (e.g. Q4_1 is
(d * q) + m, Q4_K is (d * sc) * q - (dmin * m)); these functions are compiled WITHOUT fastmath
so LLVM does not contract them into FMAs.

Every block function has the signature (flat, o, tab, dst, d0): `flat` is a 1-D uint8 array of
raw bytes, the block starts at flat[o]; it writes block_size float32 values to dst[d0:].
The driver `dequant_rows` dispatches on the ggml type id once per call (not per block).
"""
import numpy as np
from numba import njit, prange

from ._common import bf16, f16, f32, s8

QK = 256  # elements in a K-quant super-block


@njit(cache=True, inline="always")
def deq_q4_0(flat, o, tab, dst, d0):
    # 18 bytes: d fp16 | qs[16]; element j = low nibble of qs[j], element j+16 = high nibble.
    d = f16(flat, o, tab)
    for j in range(16):
        b = flat[o + 2 + j]
        dst[d0 + j] = d * np.float32(np.int32(b & 15) - 8)
        dst[d0 + 16 + j] = d * np.float32(np.int32(b >> 4) - 8)


@njit(cache=True, inline="always")
def deq_q4_1(flat, o, tab, dst, d0):
    # 20 bytes: d fp16 | m fp16 | qs[16]
    d = f16(flat, o, tab)
    m = f16(flat, o + 2, tab)
    for j in range(16):
        b = flat[o + 4 + j]
        dst[d0 + j] = d * np.float32(b & 15) + m
        dst[d0 + 16 + j] = d * np.float32(b >> 4) + m


@njit(cache=True, inline="always")
def _qh32(flat, o):
    return (np.uint32(flat[o]) | (np.uint32(flat[o + 1]) << np.uint32(8))
            | (np.uint32(flat[o + 2]) << np.uint32(16)) | (np.uint32(flat[o + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def deq_q5_0(flat, o, tab, dst, d0):
    # 22 bytes: d fp16 | qh u32 (bit j = 5th bit of element j) | qs[16]
    d = f16(flat, o, tab)
    qh = _qh32(flat, o + 2)
    for j in range(16):
        b = np.int32(flat[o + 6 + j])
        hl = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
        hh = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
        dst[d0 + j] = d * np.float32(((b & 15) | hl) - 16)
        dst[d0 + 16 + j] = d * np.float32(((b >> 4) | hh) - 16)


@njit(cache=True, inline="always")
def deq_q5_1(flat, o, tab, dst, d0):
    # 24 bytes: d fp16 | m fp16 | qh u32 | qs[16]
    d = f16(flat, o, tab)
    m = f16(flat, o + 2, tab)
    qh = _qh32(flat, o + 4)
    for j in range(16):
        b = np.int32(flat[o + 8 + j])
        hl = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
        hh = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
        dst[d0 + j] = d * np.float32((b & 15) | hl) + m
        dst[d0 + 16 + j] = d * np.float32((b >> 4) | hh) + m


@njit(cache=True, inline="always")
def deq_q8_0(flat, o, tab, dst, d0):
    # 34 bytes: d fp16 | qs int8[32]
    d = f16(flat, o, tab)
    for j in range(32):
        dst[d0 + j] = np.float32(s8(flat[o + 2 + j])) * d


@njit(cache=True, inline="always")
def deq_q2_k(flat, o, tab, dst, d0):
    # 84 bytes: scales[16] (lo nibble scale, hi nibble min) | qs[64] | d fp16 | dmin fp16
    d = f16(flat, o + 80, tab)
    dmin = f16(flat, o + 82, tab)
    for e in range(QK):
        sc = flat[o + e // 16]
        dl = d * np.float32(sc & 15)
        ml = dmin * np.float32(sc >> 4)
        h = e // 128
        k = (e % 128) // 32
        q = (flat[o + 16 + h * 32 + e % 32] >> (2 * k)) & 3
        dst[d0 + e] = dl * np.float32(q) - ml


@njit(cache=True, inline="always")
def q3k_scale(flat, o, i):
    # 16 6-bit scales packed in 12 bytes at flat[o:]: low 4 bits from bytes 0-7 (nibble i//8),
    # high 2 bits from bytes 8-11 (bit pair i//4); stored with +32 offset.
    lo = (flat[o + (i % 8)] >> (4 * (i // 8))) & 15
    hi = (flat[o + 8 + (i % 4)] >> (2 * (i // 4))) & 3
    return np.int32(lo | (hi << 4)) - 32


@njit(cache=True, inline="always")
def deq_q3_k(flat, o, tab, dst, d0):
    # 110 bytes: hmask[32] | qs[64] | scales[12] | d fp16
    d = f16(flat, o + 108, tab)
    for e in range(QK):
        dl = d * np.float32(q3k_scale(flat, o + 96, e // 16))
        h = e // 128
        k = (e % 128) // 32
        l = e % 32
        ql = np.int32((flat[o + 32 + h * 32 + l] >> (2 * k)) & 3)
        hb = np.int32((flat[o + l] >> (e // 32)) & 1)
        dst[d0 + e] = dl * np.float32(ql - 4 * (1 - hb))


@njit(cache=True, inline="always")
def k_scale_min(flat, o, s):
    # Q4_K/Q5_K: 8 (scale, min) pairs of 6 bits packed in 12 bytes at flat[o:].
    if s < 4:
        sc = flat[o + s] & 63
        mn = flat[o + 4 + s] & 63
    else:
        sc = (flat[o + 8 + s - 4] & 15) | ((flat[o + s - 4] >> 2) & 0x30)
        mn = (flat[o + 8 + s - 4] >> 4) | ((flat[o + 4 + s - 4] >> 2) & 0x30)
    return sc, mn


@njit(cache=True, inline="always")
def deq_q4_k(flat, o, tab, dst, d0):
    # 144 bytes: d fp16 | dmin fp16 | scales[12] | qs[128]; sub-block s (32 elements) uses
    # nibble s%2 of qs[32*(s//2) : 32*(s//2)+32].
    d = f16(flat, o, tab)
    dmin = f16(flat, o + 2, tab)
    for s in range(8):
        sc, mn = k_scale_min(flat, o + 4, s)
        ds = d * np.float32(sc)
        dm = dmin * np.float32(mn)
        base = o + 16 + 32 * (s // 2)
        sh = 4 * (s % 2)
        for l in range(32):
            dst[d0 + 32 * s + l] = ds * np.float32((flat[base + l] >> sh) & 15) - dm


@njit(cache=True, inline="always")
def deq_q5_k(flat, o, tab, dst, d0):
    # 176 bytes: d | dmin | scales[12] | qh[32] (bit s = 5th bit of sub-block s) | qs[128]
    d = f16(flat, o, tab)
    dmin = f16(flat, o + 2, tab)
    for s in range(8):
        sc, mn = k_scale_min(flat, o + 4, s)
        ds = d * np.float32(sc)
        dm = dmin * np.float32(mn)
        base = o + 48 + 32 * (s // 2)
        sh = 4 * (s % 2)
        for l in range(32):
            q = ((flat[base + l] >> sh) & 15) | (((flat[o + 16 + l] >> s) & 1) << 4)
            dst[d0 + 32 * s + l] = ds * np.float32(q) - dm


@njit(cache=True, inline="always")
def deq_q6_k(flat, o, tab, dst, d0):
    # 210 bytes: ql[128] | qh[64] | scales int8[16] | d fp16
    d = f16(flat, o + 208, tab)
    for e in range(QK):
        h = e // 128
        r = e % 128
        ql = (flat[o + h * 64 + r % 64] >> (4 * (r // 64))) & 15
        qh = (flat[o + 128 + h * 32 + r % 32] >> (2 * (r // 32))) & 3
        q = np.int32(ql | (qh << 4)) - 32
        dl = d * np.float32(s8(flat[o + 192 + e // 16]))
        dst[d0 + e] = dl * np.float32(q)


@njit(cache=True, inline="always")
def deq_f16(flat, o, tab, dst, d0):
    dst[d0] = f16(flat, o, tab)


@njit(cache=True, inline="always")
def deq_bf16(flat, o, tab, dst, d0):
    dst[d0] = bf16(flat, o)


@njit(cache=True, inline="always")
def deq_f32(flat, o, tab, dst, d0):
    dst[d0] = f32(flat, o)


@njit(cache=True, parallel=True)
def dequant_rows(kind, flat, stride, nrows, ncols, bs, ts, tab, out):
    """flat: uint8 bytes, row r starts at flat[r*stride]; out: float32 (nrows, ncols) C-order.
    kind: ggml type id; bs/ts: block size in elements / bytes."""
    nb = ncols // bs
    for r in prange(nrows):
        dst = out[r]
        for b in range(nb):
            o = r * stride + b * ts
            d0 = b * bs
            if kind == 2:
                deq_q4_0(flat, o, tab, dst, d0)
            elif kind == 3:
                deq_q4_1(flat, o, tab, dst, d0)
            elif kind == 6:
                deq_q5_0(flat, o, tab, dst, d0)
            elif kind == 7:
                deq_q5_1(flat, o, tab, dst, d0)
            elif kind == 8:
                deq_q8_0(flat, o, tab, dst, d0)
            elif kind == 10:
                deq_q2_k(flat, o, tab, dst, d0)
            elif kind == 11:
                deq_q3_k(flat, o, tab, dst, d0)
            elif kind == 12:
                deq_q4_k(flat, o, tab, dst, d0)
            elif kind == 13:
                deq_q5_k(flat, o, tab, dst, d0)
            elif kind == 14:
                deq_q6_k(flat, o, tab, dst, d0)
            elif kind == 1:
                deq_f16(flat, o, tab, dst, d0)
            elif kind == 30:
                deq_bf16(flat, o, tab, dst, d0)
            elif kind == 0:
                deq_f32(flat, o, tab, dst, d0)
