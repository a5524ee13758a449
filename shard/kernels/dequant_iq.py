"""Dequantization of the low-bit GGUF types (IQ1_S ... IQ4_XS, MXFP4, TQ1_0, TQ2_0) to float32,
bit-exact with gguf.quants.dequantize.

Bit-exactness means gguf-py's float32 operations in gguf-py's order, compiled WITHOUT fastmath
(LLVM must not contract a * b + c into an FMA): e.g. IQ2_XXS is ((d * (0.5 + s)) * 0.25) * g
with the sign applied last (a multiplication by -1 is an exact negation).  Every constant is an
np.float32: a Python float would promote the arithmetic to float64 and round differently.

Block functions have dequant.py's signature (flat, o, tab, dst, d0): `flat` a 1-D uint8 array of
raw bytes with the block at flat[o], `tab` the fp16 -> float32 table (_common.F16_TABLE); they
write block_size float32 values to dst[d0:].  `deq_row(kind, flat, o, nb, tab, dst)` decodes nb
consecutive blocks (one row) and dispatches on the type id once per row, so one compiled
function serves all twelve types.

Grids (module-level constants, frozen into the compiled code): the lattice points of the IQ
types, decoded from gguf.quants' packed tables at import, as int8 rows (GRID_IQ2XXS [256, 8],
GRID_IQ2XS [512, 8], GRID_IQ2S [1024, 8], GRID_IQ3XXS [256, 4], GRID_IQ3S [512, 4], GRID_IQ1S
[2048, 8] shared by IQ1_M) and as the float32 rows the decoders load (GF_*: 8-64 KiB each, L2),
KSIGNS [128] (7 sign bits + their parity as the 8th) and its +-1 rows SGN7 / SGN8, the IQ4
non-linear values and the doubled E2M1 values of MXFP4 (baked into simd_iq's nibble lookups).
The 8- and 32-lane work (grid rows, nibble codes, ternary digits) is LLVM vector IR in
simd_iq.py; the control flow around it is numba.
"""
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf import quants as _gq
from numba import njit, prange

from ._common import u32_as_f32
from .simd_iq import _nibbles, add8, mul8, mul44, tq1_4, tq1_16, tq1_32, tq2_32

QK = 256  # elements per super-block


def _grid(cls) -> np.ndarray:
    """gguf-py's packed hex grid -> int8 [n, 8 or 4] lattice values (exact small integers)."""
    cls.init_grid()
    g = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    out = g.astype(np.int8)
    assert np.array_equal(out.astype(np.float32), g)  # every grid value is a small integer
    return out


GRID_IQ2XXS = _grid(_gq.IQ2_XXS)
GRID_IQ2XS = _grid(_gq.IQ2_XS)
GRID_IQ2S = _grid(_gq.IQ2_S)
GRID_IQ3XXS = _grid(_gq.IQ3_XXS)
GRID_IQ3S = _grid(_gq.IQ3_S)
GRID_IQ1S = _grid(_gq.IQ1_S)  # IQ1_M uses the same grid
KSIGNS = np.frombuffer(_gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()
KV_IQ4 = np.array(_gq.IQ4_NL.kvalues, dtype=np.int8)
KV_FP4 = np.array(_gq.MXFP4.kvalues, dtype=np.int8)
IQ1_DELTA = np.float32(_gq.IQ1_S.delta)  # 0.125
# the delta by its sign bit, read from a table: a branch on a random bit mispredicted half the
# time (IQ1_M has one per 8 elements: 3.5x slower decoding than with this lookup)
IQ1_DELTAS = np.array([IQ1_DELTA, -IQ1_DELTA], dtype=np.float32)
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)  # TQ1_0's base-3 digit multipliers
# Float32 tables the decoders read whole rows of (8 or 4 contiguous floats: one vector load,
# where per-element int8 -> float conversions and sign branches kept LLVM scalar): the grids as
# float32; SGN7[i, k] = -1 where bit k of KSIGNS[i] is set, else +1; SGN8[b, k] the same for the
# bits of a byte.
# Multiplying by +-1.0 is exact, so db * grid * sign is what gguf-py computes, bit for bit.
GF_IQ2XXS, GF_IQ2XS, GF_IQ2S = (g.astype(np.float32) for g in (GRID_IQ2XXS, GRID_IQ2XS, GRID_IQ2S))
GF_IQ3XXS, GF_IQ3S, GF_IQ1S = (g.astype(np.float32) for g in (GRID_IQ3XXS, GRID_IQ3S, GRID_IQ1S))
_BITS = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
SGN8 = np.where(_BITS == 1, np.float32(-1), np.float32(1)).astype(np.float32)
SGN7 = SGN8[KSIGNS]
for _a in (IQ1_DELTAS, GRID_IQ2XXS, GRID_IQ2XS, GRID_IQ2S, GRID_IQ3XXS, GRID_IQ3S, GRID_IQ1S, KSIGNS, KV_IQ4, KV_FP4, POW3,
           GF_IQ2XXS, GF_IQ2XS, GF_IQ2S, GF_IQ3XXS, GF_IQ3S, GF_IQ1S, SGN8, SGN7):
    _a.flags.writeable = False

# 32 nibble codes -> s * value, vectorized (simd_iq._nibbles: the table is baked into the code)
nib_iq4, nib_fp4 = _nibbles(KV_IQ4), _nibbles(KV_FP4)

# the types this module handles: ggml id -> (elements, bytes) per block
IQ_TYPES = {int(t): GGML_QUANT_SIZES[t] for t in (G.IQ1_S, G.IQ1_M, G.IQ2_XXS, G.IQ2_XS, G.IQ2_S, G.IQ3_XXS,
                                                   G.IQ3_S, G.IQ4_NL, G.IQ4_XS, G.MXFP4, G.TQ1_0, G.TQ2_0)}
_K_IQ2_XXS, _K_IQ2_XS, _K_IQ3_XXS, _K_IQ1_S = int(G.IQ2_XXS), int(G.IQ2_XS), int(G.IQ3_XXS), int(G.IQ1_S)
_K_IQ4_NL, _K_IQ3_S, _K_IQ2_S, _K_IQ4_XS = int(G.IQ4_NL), int(G.IQ3_S), int(G.IQ2_S), int(G.IQ4_XS)
_K_IQ1_M, _K_TQ1_0, _K_TQ2_0, _K_MXFP4 = int(G.IQ1_M), int(G.TQ1_0), int(G.TQ2_0), int(G.MXFP4)

_F0_25, _F0_5, _F1 = np.float32(0.25), np.float32(0.5), np.float32(1.0)


@njit(cache=True, inline="always")
def _u16(flat, i):
    return np.uint32(flat[i]) | (np.uint32(flat[i + 1]) << np.uint32(8))


@njit(cache=True, inline="always")
def _u32(flat, i):
    return (np.uint32(flat[i]) | (np.uint32(flat[i + 1]) << np.uint32(8))
            | (np.uint32(flat[i + 2]) << np.uint32(16)) | (np.uint32(flat[i + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def _h(flat, i, tab):
    """fp16 at flat[i:i+2] -> float32."""
    return tab[np.int64(flat[i]) | (np.int64(flat[i + 1]) << 8)]


@njit(cache=True, inline="always")
def _signed8(dst, d0, db, grid, gi, sgn, si):
    """dst[d0:d0+8] = db * grid[gi] * sgn[si] as one 8-lane vector (simd_iq.mul8)."""
    mul8(dst, d0, db, grid, gi, sgn, si)


@njit(cache=True)
def deq_iq2_xxs(flat, o, tab, dst, d0):
    # 66 bytes: d fp16 | 8 x (u32 grid bytes, u32 signs 4x7 bits + scale in bits 28..31);
    # sub-block ib (32 elements) = 4 groups of 8 = rows of GRID_IQ2XXS
    B, W = flat[o:o + 66], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for ib in range(8):
        p = 2 + 8 * ib
        a1 = _u32(B, p + 4)
        db = d * (_F0_5 + np.float32(a1 >> np.uint32(28))) * _F0_25
        for l in range(4):
            si = (a1 >> np.uint32(7 * l)) & np.uint32(127)
            _signed8(W, 32 * ib + 8 * l, db, GF_IQ2XXS, B[p + l], SGN7, si)


@njit(cache=True)
def deq_iq2_xs(flat, o, tab, dst, d0):
    # 74 bytes: d | qs u16[32] (9-bit grid index | 7-bit sign index per 8 elements) | scales[8]
    # (a nibble per 16 elements)
    B, W = flat[o:o + 74], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for g in range(32):
        q = _u16(B, 2 + 2 * g)
        s = (B[66 + g // 4] >> (4 * ((g // 2) % 2))) & 15
        db = d * (_F0_5 + np.float32(s)) * _F0_25
        _signed8(W, 8 * g, db, GF_IQ2XS, q & np.uint32(511), SGN7, q >> np.uint32(9))


@njit(cache=True)
def deq_iq2_s(flat, o, tab, dst, d0):
    # 82 bytes: d | qs[32] (low 8 index bits) | signs[32] (one byte per 8 elements) |
    # qh[8] (2 high index bits per group) | scales[8] (a nibble per 16 elements)
    B, W = flat[o:o + 82], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for g in range(32):
        hi = (np.int64(B[66 + g // 4]) >> (2 * (g % 4))) & 3
        gi = np.int64(B[2 + g]) | (hi << 8)
        s = (B[74 + g // 4] >> (4 * ((g // 2) % 2))) & 15
        db = d * (_F0_5 + np.float32(s)) * _F0_25
        _signed8(W, 8 * g, db, GF_IQ2S, gi, SGN8, B[34 + g])


@njit(cache=True)
def deq_iq3_xxs(flat, o, tab, dst, d0):
    # 98 bytes: d | qs[64] (a GRID_IQ3XXS row of 4 per byte) | 8 x u32 (signs 4x7 bits, scale
    # in bits 28..31) per 32 elements
    B, W = flat[o:o + 98], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for ib in range(8):
        aux = _u32(B, 66 + 4 * ib)
        db = d * (_F0_5 + np.float32(aux >> np.uint32(28))) * _F0_5
        for l in range(4):
            si = (aux >> np.uint32(7 * l)) & np.uint32(127)
            e0 = 32 * ib + 8 * l
            qa, qb = B[2 + 8 * ib + 2 * l], B[3 + 8 * ib + 2 * l]
            mul44(W, e0, db, GF_IQ3XXS, qa, qb, SGN7, si)  # two grid rows of 4, one sign pattern


@njit(cache=True)
def deq_iq3_s(flat, o, tab, dst, d0):
    # 110 bytes: d | qs[64] (low 8 index bits per 4 elements) | qh[8] (9th bit) | signs[32] |
    # scales[4] (a nibble per 32 elements, db = d * (1 + 2 s))
    B, W = flat[o:o + 110], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for ib in range(8):
        s = np.int32((B[106 + ib // 2] >> (4 * (ib % 2))) & 15)
        db = d * np.float32(1 + 2 * s)
        h = np.int64(B[66 + ib])  # the 9th index bit of the sub-block's 8 groups of 4
        for l in range(4):  # pairs of groups: one sign byte, a nibble each
            g = 8 * ib + 2 * l
            ga = np.int64(B[2 + g]) | (((h >> (2 * l)) & 1) << 8)
            gb = np.int64(B[3 + g]) | (((h >> (2 * l + 1)) & 1) << 8)
            sb = B[74 + 4 * ib + l]
            mul44(W, 4 * g, db, GF_IQ3S, ga, gb, SGN8, sb)


@njit(cache=True, inline="always")
def _iq1_group(dst, d0, dl, gi, neg):
    """dst[d0:d0+8] = dl * (GRID_IQ1S[gi] + delta), delta = -1/8 if neg (0 or 1) else +1/8."""
    add8(dst, d0, dl, GF_IQ1S, gi, IQ1_DELTAS[neg])


@njit(cache=True)
def deq_iq1_s(flat, o, tab, dst, d0):
    # 50 bytes: d | qs[32] (low 8 index bits per 8 elements) | qh u16[8] per 32 elements:
    # bits 0..11 = 3 high index bits of its 4 groups, 12..14 = scale, 15 = delta sign
    B, W = flat[o:o + 50], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    for ib in range(8):
        h = _u16(B, 34 + 2 * ib)
        dl = d * np.float32(2 * ((h >> np.uint32(12)) & np.uint32(7)) + np.uint32(1))
        neg = h >> np.uint32(15)
        for l in range(4):
            gi = np.int64(B[2 + 4 * ib + l]) | (np.int64((h >> np.uint32(3 * l)) & np.uint32(7)) << 8)
            _iq1_group(W, 32 * ib + 8 * l, dl, gi, neg)


@njit(cache=True)
def deq_iq1_m(flat, o, tab, dst, d0):
    # 56 bytes: qs[32] | qh[16] (per 8 elements a nibble: 3 high index bits + delta sign) |
    # scales u16[4]: 3-bit scales per 16 elements in bits 0..11, the fp16 d in the 4 top nibbles
    B, W = flat[o:o + 56], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    s0, s1 = _u16(B, 48), _u16(B, 50)
    s2, s3 = _u16(B, 52), _u16(B, 54)
    dbits = ((s0 >> np.uint32(12)) | ((s1 >> np.uint32(8)) & np.uint32(0xF0))
             | ((s2 >> np.uint32(4)) & np.uint32(0xF00)) | (s3 & np.uint32(0xF000)))
    d = tab[np.int64(dbits)]
    for w in range(4):  # scale word w: the 3-bit scales of halves i = 4 w .. 4 w + 3
        sw = np.int64(_u16(B, 48 + 2 * w))
        for h in range(4):  # half i (16 elements): groups 2 i, 2 i + 1, their qh byte 32 + i
            i = 4 * w + h
            dl = d * np.float32(2 * ((sw >> (3 * h)) & 7) + 1)
            qh = np.int64(B[32 + i])
            _iq1_group(W, 16 * i, dl, np.int64(B[2 * i]) | ((qh & 7) << 8), (qh >> 3) & 1)
            _iq1_group(W, 16 * i + 8, dl, np.int64(B[2 * i + 1]) | ((qh & 0x70) << 4), qh >> 7)


@njit(cache=True)
def deq_iq4_nl(flat, o, tab, dst, d0):
    # 18 bytes: d | qs[16]; element j = KV_IQ4[low nibble of qs[j]], j + 16 = high nibble
    B, W = flat[o:o + 18], dst[d0:d0 + 32]  # block views: indices from 0, no wraparound selects
    nib_iq4(W, 0, _h(B, 0, tab), B, 2)


@njit(cache=True)
def deq_iq4_xs(flat, o, tab, dst, d0):
    # 136 bytes: d | scales_h u16 (2 bits per 32 elements) | scales_l[4] (nibbles) | qs[128];
    # sub-block ib: scale (l | h << 4) - 32, nibbles as IQ4_NL over qs[16 ib : 16 ib + 16]
    B, W = flat[o:o + 136], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 0, tab)
    sh = _u16(B, 2)
    for ib in range(8):
        ls = np.int32((B[4 + ib // 2] >> (4 * (ib % 2))) & 15)
        hs = np.int32((sh >> np.uint32(2 * ib)) & np.uint32(3))
        dl = d * np.float32((ls | (hs << 4)) - 32)
        nib_iq4(W, 32 * ib, dl, B, 8 + 16 * ib)


@njit(cache=True, inline="always")
def e8m0_half(e):
    """E8M0 exponent byte -> 2^(e - 128) as float32 (half the OCP scale: KV_FP4 is doubled);
    e = 0 and 1 are float32 subnormals (ggml_e8m0_to_fp32_half)."""
    e = np.uint32(e)
    bits = (np.uint32(0x00200000) << e) if e < np.uint32(2) else ((e - np.uint32(1)) << np.uint32(23))
    return u32_as_f32(bits)


@njit(cache=True)
def deq_mxfp4(flat, o, tab, dst, d0):
    # 17 bytes: E8M0 exponent | qs[16]; nibble order as IQ4_NL, values KV_FP4 (E2M1 doubled)
    B, W = flat[o:o + 17], dst[d0:d0 + 32]  # block views: indices from 0, no wraparound selects
    nib_fp4(W, 0, e8m0_half(B[0]), B, 1)


@njit(cache=True)
def deq_tq1_0(flat, o, tab, dst, d0):
    # 54 bytes: qs[48] (5 trits per byte) | qh[4] (4 trits per byte) | d fp16; element order:
    # trit p of qs[j] -> 32 p + j (j < 32), 160 + 16 p + (j - 32) (32 <= j < 48);
    # trit p of qh[j] -> 240 + 4 p + j
    B, W = flat[o:o + 54], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 52, tab)
    # digit p of a byte b is (uint8(b * 3^p) * 3) >> 8 (a base-3 fraction scaled to 256; the
    # product wraps mod 256 as gguf-py's uint8 arithmetic), computed in byte lanes (simd_iq)
    for p in range(5):
        tq1_32(W, 32 * p, d, B, 0, POW3[p])
        tq1_16(W, 160 + 16 * p, d, B, 32, POW3[p])
    for p in range(4):
        tq1_4(W, 240 + 4 * p, d, B, 48, POW3[p])


@njit(cache=True)
def deq_tq2_0(flat, o, tab, dst, d0):
    # 66 bytes: qs[64] (2 bits per element) | d fp16; element 128 h + 32 k + j = bits 2k of
    # qs[32 h + j], minus 1
    B, W = flat[o:o + 66], dst[d0:d0 + 256]  # block views: indices from 0, no wraparound selects
    d = _h(B, 64, tab)
    for h in range(2):
        for k in range(4):  # 32 lanes: ((qs[32 h + j] >> 2 k) & 3) - 1
            tq2_32(W, 128 * h + 32 * k, d, B, 32 * h, 2 * k)


@njit(cache=True)
def deq_row(kind, flat, o, nb, tab, dst):
    """nb consecutive blocks of type `kind` starting at flat[o] -> dst[0 : nb * block_size]."""
    if kind == _K_IQ2_XXS:
        for b in range(nb):
            deq_iq2_xxs(flat, o + 66 * b, tab, dst, QK * b)
    elif kind == _K_IQ2_XS:
        for b in range(nb):
            deq_iq2_xs(flat, o + 74 * b, tab, dst, QK * b)
    elif kind == _K_IQ2_S:
        for b in range(nb):
            deq_iq2_s(flat, o + 82 * b, tab, dst, QK * b)
    elif kind == _K_IQ3_XXS:
        for b in range(nb):
            deq_iq3_xxs(flat, o + 98 * b, tab, dst, QK * b)
    elif kind == _K_IQ3_S:
        for b in range(nb):
            deq_iq3_s(flat, o + 110 * b, tab, dst, QK * b)
    elif kind == _K_IQ1_S:
        for b in range(nb):
            deq_iq1_s(flat, o + 50 * b, tab, dst, QK * b)
    elif kind == _K_IQ1_M:
        for b in range(nb):
            deq_iq1_m(flat, o + 56 * b, tab, dst, QK * b)
    elif kind == _K_IQ4_NL:
        for b in range(nb):
            deq_iq4_nl(flat, o + 18 * b, tab, dst, 32 * b)
    elif kind == _K_IQ4_XS:
        for b in range(nb):
            deq_iq4_xs(flat, o + 136 * b, tab, dst, QK * b)
    elif kind == _K_MXFP4:
        for b in range(nb):
            deq_mxfp4(flat, o + 17 * b, tab, dst, 32 * b)
    elif kind == _K_TQ1_0:
        for b in range(nb):
            deq_tq1_0(flat, o + 54 * b, tab, dst, QK * b)
    elif kind == _K_TQ2_0:
        for b in range(nb):
            deq_tq2_0(flat, o + 66 * b, tab, dst, QK * b)


@njit(cache=True, parallel=True)
def deq_rows_parallel(kind, flat, stride, nrows, nb, tab, out):
    """out float32 (nrows, >= nb * block_size) C-order <- rows r (at flat[r * stride]) decoded."""
    for r in prange(nrows):
        deq_row(kind, flat, r * stride, nb, tab, out[r])


@njit(cache=True)
def deq_rows_serial(kind, flat, stride, nrows, nb, tab, out):
    """deq_rows_parallel on the calling thread (a few rows: an embedding lookup; next to BLAS)."""
    for r in range(nrows):
        deq_row(kind, flat, r * stride, nb, tab, out[r])


# ggml id -> one-block decoder
BLOCK_DECODERS = {_K_IQ2_XXS: deq_iq2_xxs, _K_IQ2_XS: deq_iq2_xs, _K_IQ2_S: deq_iq2_s, _K_IQ3_XXS: deq_iq3_xxs,
                  _K_IQ3_S: deq_iq3_s, _K_IQ1_S: deq_iq1_s, _K_IQ1_M: deq_iq1_m, _K_IQ4_NL: deq_iq4_nl,
                  _K_IQ4_XS: deq_iq4_xs, _K_MXFP4: deq_mxfp4, _K_TQ1_0: deq_tq1_0, _K_TQ2_0: deq_tq2_0}
