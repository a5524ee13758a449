"""Encoding KV rows into the stored cache types (kv_cache.encode): bf16 and q8_0 in numba, as a
decode step appends 2 rows per layer and numpy's dozen-call q8_0 quantizer took ~40 us a row
(2.5 ms of a 30-layer SmolLM2 token).  Shapes: x float32 [n, d] (d a multiple of 32 for q8_0).
"""
import numpy as np
from numba import njit


@njit(cache=True)
def _f16_bits(b):
    """float32 bit pattern -> IEEE half bits, round to nearest even: numpy's
    npy_floatbits_to_halfbits (so the bytes equal astype(np.float16)'s)."""
    sgn = (b & 0x80000000) >> 16
    e = b & 0x7F800000
    if e >= 0x47800000:                       # overflow, inf or nan
        if e == 0x7F800000 and (b & 0x007FFFFF) != 0:
            r = 0x7C00 + ((b & 0x007FFFFF) >> 13)
            return sgn + (r + 1 if r == 0x7C00 else r)
        return sgn + 0x7C00
    if e <= 0x38000000:                       # half subnormal or zero
        if e < 0x33000000:
            return sgn
        sig = 0x00800000 + (b & 0x007FFFFF)
        sig >>= 113 - (e >> 23)
        if (sig & 0x3FFF) != 0x1000 or (b & 0x7FF) != 0:
            sig += 0x1000
        return sgn + (sig >> 13)
    sig = b & 0x007FFFFF
    if (sig & 0x3FFF) != 0x1000:
        sig += 0x1000
    return (sgn + ((e - 0x38000000) >> 13) + (sig >> 13)) & 0xFFFF


@njit(cache=True)
def encode_q8_0(x, out):
    """x float32 [n, d] C-order -> out int8 [n, d / 32 * 34]: ggml's quantize_row_q8_0_ref (d =
    amax / 127 in float32, codes roundf(x * (1 / d)), d stored as fp16 little-endian)."""
    n, D = x.shape
    nb = D // 32
    for r in range(n):
        for b in range(nb):
            amax = np.float32(0.0)
            for i in range(32):
                a = abs(x[r, b * 32 + i])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            tmp = np.empty(1, np.float32)
            tmp[0] = d
            h = _f16_bits(np.uint32(tmp.view(np.uint32)[0]))
            o = b * 34
            out[r, o] = np.int8(np.int32(h & 0xFF) - 256 if (h & 0xFF) > 127 else h & 0xFF)
            hi = (h >> 8) & 0xFF
            out[r, o + 1] = np.int8(np.int32(hi) - 256 if hi > 127 else hi)
            for i in range(32):
                y = x[r, b * 32 + i] * inv
                q = np.floor(abs(y) + np.float32(0.5))
                out[r, o + 2 + i] = np.int8(-q if y < 0 else q)


@njit(cache=True)
def encode_bf16(u, out):
    """float32 bits u uint32 [m] -> bf16 bits out uint16 [m], round to nearest even."""
    for i in range(u.shape[0]):
        b = u[i]
        out[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
