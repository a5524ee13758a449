"""IQ1_S, IQ1_M and TQ1_0 rows with 8-bit activations and integer dot products (issue 15): the
weight side of rows_iq8's kernels for the three lowest-bit types.  rows_iq8 merges IQ1_SPECS
into its own table, so these types share its row kernels (one token, up to 16 tokens), its
drivers (matvec, gathered products, T <= products_iq.INT8_MAX_T) and its batch invariance.

Activations: llama.cpp computes all three against Q8_K x (ggml-cpu's vec_dot_type for
IQ1_S / IQ1_M / TQ1_0): per 256 elements int8 xq = round(x / dx), dx = max|x| / 127
(drivers_i8.quant_x_q8k, the IQ4_XS / IQ2 path's quantization).

    IQ1_S (50 B per 256: d fp16 | qs[32] | qh u16[8]): per 32-element sub-block ib, h = qh[ib]
        holds 4 x 3 high grid-index bits (bits 0-11), the scale ls (12-14) and the delta sign
        (15); group l (8 elements) is GRID_IQ1S[qs[4 ib + l] | ((h >> 3 l) & 7) << 8]
        (values -1 / 0 / 1) and
            w = d (2 ls + 1) (g + delta),  delta = -1/8 if bit 15 else +1/8
    IQ1_M (56 B: qs[32] | qh[16] | scales u16[4]): the same grid; per 8 elements its own 3 high
        index bits and delta sign (a nibble of qh), a 3-bit scale per 16 elements, and the fp16
        d spread over the 4 top nibbles of the scale words
    TQ1_0 (54 B: qs[48] 5 trits per byte | qh[4] 4 trits per byte | d fp16): w = d (t - 1),
        trit p of byte b = (uint8(b * 3^p) * 3) >> 8 (the element order of dequant_iq.deq_tq1_0)

llama.cpp handles the IQ1 delta as a second integer sum (the x block sums times +-1, then
* 1/8) and TQ1_0's "- 1" through the Q8_K block sums.  Here both are folded into the int8
weight value instead, which gives the same exact integer:
    8 (g + delta) = 8 g +- 1  in {-9, -7, -1, 1, 7, 9}    (IQ1_S / IQ1_M)
    t - 1                     in {-1, 0, 1}                (TQ1_0)
so a block is one integer sum  sum_j (2 ls_j + 1) sum_{i in j} v_i xq_i  (vpmaddubsw with the
sign trick: pair sums <= 2 * 9 * 127, exact; vpmaddwd by the scale into int32 lanes: at most
32 terms of 9 * 127 * 15 per lane, far below 2^31) times d / 8 (IQ1) or d (TQ1_0), d / 8 exact
(a power of two).  The dequantized weights are exactly d (2 ls + 1) v / 8 in float32 too (fp16
d times a 4-bit odd scale times a 4-bit v: <= 19 significant bits), so the only roundings are
rows_iq8's: s * dx, the int -> float conversion (exact below 2^24) and the float accumulation.

Per spec (as rows_iq8._SPECS): (block bytes, elements per x scale, decode, token); decode runs
once per block (for every token of a multi-token call), token per token.
Cache note: rows_iq8's numba cache holds this code inlined and is keyed on the text of
rows_iq8.py only, so numba's cache of this package is dropped whenever any of its files changes (kernels/__init__.py).
"""
import numpy as np
from gguf import GGMLQuantizationType as G
from llvmlite import ir

from .dequant_iq import GRID_IQ1S
from .rows import F32, I8, I16, I32, I64, PREFETCH_BYTES, V
from .i8_ir import STRICT

K_IQ1_S, K_IQ1_M, K_TQ1_0 = int(G.IQ1_S), int(G.IQ1_M), int(G.TQ1_0)

# The IQ1 grid with the delta folded in, as little-endian words (byte j = element j): entry
# gi | neg << 11 (gi the 11-bit grid index, neg the delta sign bit) = 8 GRID_IQ1S[gi] + (1 or -1
# if neg) = 8 (g + delta) exactly; 4096 x 8 B = 32 KiB (L1 / L2).  One load per 8 elements: a
# grid load plus a select and a byte add per group measured 2x slower for IQ1_M (a sign per 8).
_G8 = np.ascontiguousarray(GRID_IQ1S).astype(np.int16) * 8
_GRID1D = np.concatenate([_G8 + 1, _G8 - 1]).astype(np.int8).view("<u8").ravel().astype(np.uint64)
_I64 = ir.IntType(64)


def _grid_delta(e, b, idxs):
    """<32 x i8>: the 4 words _GRID1D[idxs[k]] (i32 indices) side by side."""
    from .rows_iq8 import _table, _words  # lazily: rows_iq8 imports this module
    return _words(b, _table(b, "dsd.grid_iq1_delta", _GRID1D, _I64), idxs, _I64, 4)


def _u16(e, b, off):
    return b.zext(e.ld(off, 1, I16), I32)


def _c(v):
    return ir.Constant(I32, v)


def _dec_iq1_s(e, b, ops, ob):
    # 50 B: d | qs[32] | qh u16[8]; sub-block ib (elements 32 ib ..): 4 grid words + its delta
    # sign (one per 32 elements), its scale 2 ls + 1 for all 32 (an <16 x i16> splat)
    vs, scs = [], []
    for ib in range(8):
        h = _u16(e, b, e.at(ob, 34 + 2 * ib))
        neg = b.shl(b.lshr(h, _c(15)), _c(11))
        gi = [b.or_(b.or_(b.zext(e.ld(e.at(ob, 2 + 4 * ib + l), 1), I32),
                          b.shl(b.and_(b.lshr(h, _c(3 * l)), _c(7)), _c(8))), neg) for l in range(4)]
        vs.append(_grid_delta(e, b, gi))
        sc = b.add(b.shl(b.and_(b.lshr(h, _c(12)), _c(7)), _c(1)), _c(1))
        scs.append(e.splat(b.trunc(sc, I16), 16))
    return vs, scs, b.fmul(e.f16(ob), ir.Constant(F32, 0.125), flags=STRICT)


def _dec_iq1_m(e, b, ops, ob):
    # 56 B: qs[32] | qh[16] | scales u16[4].  Half i (16 elements 16 i ..): qh[i]'s low nibble =
    # group 2 i's 3 high index bits + delta sign (bit 3), its high nibble group 2 i + 1's; scale
    # word w = i // 4, bits 3 (i % 4) .. +2; d = the top nibbles of the 4 words (word k: bits
    # 4 k .. 4 k + 3 of the fp16 pattern)
    e.prefetch(e.at(ob, PREFETCH_BYTES + 64))
    sw = [_u16(e, b, e.at(ob, 48 + 2 * k)) for k in range(4)]
    dbits = b.or_(b.or_(b.lshr(sw[0], _c(12)), b.and_(b.lshr(sw[1], _c(8)), _c(0xF0))),
                  b.or_(b.and_(b.lshr(sw[2], _c(4)), _c(0xF00)), b.and_(sw[3], _c(0xF000))))
    d = b.load(b.gep(e.td, [b.zext(dbits, I64)]))  # the fp16 table (exact)
    vs, scs = [], []
    for ib in range(8):
        gi, hs = [], []
        for i in (2 * ib, 2 * ib + 1):
            # a qh nibble is (3 high index bits | delta sign << 3): shifted to bit 8 it is
            # exactly the _GRID1D index bits 8-11
            qh = b.zext(e.ld(e.at(ob, 32 + i), 1), I32)
            gi.append(b.or_(b.zext(e.ld(e.at(ob, 2 * i), 1), I32), b.shl(b.and_(qh, _c(0x0F)), _c(8))))
            gi.append(b.or_(b.zext(e.ld(e.at(ob, 2 * i + 1), 1), I32), b.shl(b.and_(qh, _c(0xF0)), _c(4))))
            s3 = b.and_(b.lshr(sw[i // 4], _c(3 * (i % 4))), _c(7))
            hs.append(e.splat(b.trunc(b.add(b.shl(s3, _c(1)), _c(1)), I16), 8))
        vs.append(_grid_delta(e, b, gi))
        scs.append(e.cat(hs[0], hs[1]))  # int16 lanes 0-7 = elements 0-15 of the sub-block
    return vs, scs, b.fmul(d, ir.Constant(F32, 0.125), flags=STRICT)


def _tok_scaled(e, b, ops, w, xv):
    """sum over the 8 sub-blocks of (their scales) * (sum v xq) in <8 x i32> lanes, and d / 8."""
    vs, scs, s = w
    isum = ir.Constant(V(I32, 8), [0] * 8)
    for ib in range(8):
        isum = b.add(isum, ops.dot32(vs[ib], xv(32 * ib), scs[ib]))
    return isum, s


def _trits(e, b, q, mult):
    """<n x i8> bytes q, per-lane multipliers 3^p (list) -> <n x i8> base-3 digits p minus 1:
    (uint16(uint8(q * 3^p)) * 3) >> 8 - 1, in {-1, 0, 1} (bytes > 242 decode to 2 as well)."""
    n = q.type.count
    m = b.mul(q, e.cv(I8, mult))  # wraps mod 256, as gguf-py's uint8 arithmetic
    t = b.lshr(b.mul(b.zext(m, V(I16, n)), e.cv(I16, [3] * n)), e.cv(I16, [8] * n))
    return b.sub(b.trunc(t, V(I8, n)), e.k8(1, n))


def _dec_tq1_0(e, b, ops, ob):
    # 54 B: qs[48] | qh[4] | d.  Chunks of 32 elements: 32 p .. (p < 5) = digit p of qs[0:32];
    # 160 + 32 k .. (k = 0, 1) = digits 2 k, 2 k + 1 of qs[32:48]; 224 .. 239 = digit 4 of
    # qs[32:48] and 240 + 4 p + j = digit p of qh[j]
    q0 = e.ld(ob, 32)
    vs = [_trits(e, b, q0, [3 ** p] * 32) for p in range(5)]
    q1 = e.ld(e.at(ob, 32), 16)
    q11 = e.cat(q1, q1)
    for k in range(2):
        vs.append(_trits(e, b, q11, [3 ** (2 * k)] * 16 + [3 ** (2 * k + 1)] * 16))
    qh = e.ld(e.at(ob, 48), 4)
    qh16 = e.shuf(qh, [0, 1, 2, 3] * 4)
    vs.append(_trits(e, b, e.cat(q1, qh16), [81] * 16 + [3 ** p for p in range(4) for _ in range(4)]))
    return vs, e.f16(e.at(ob, 52))


def _tok_tq1_0(e, b, ops, w, xv):
    vs, d = w
    isum = ir.Constant(V(I32, 8), [0] * 8)
    for c in range(8):
        isum = b.add(isum, ops.dot32(vs[c], xv(32 * c)))
    return isum, d


IQ1_SPECS = {K_IQ1_S: (50, 256, _dec_iq1_s, _tok_scaled), K_IQ1_M: (56, 256, _dec_iq1_m, _tok_scaled),
             K_TQ1_0: (54, 256, _dec_tq1_0, _tok_tq1_0)}
IQ1_KINDS = tuple(IQ1_SPECS)
