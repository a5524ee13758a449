"""Matvec-only block decoders in "dword lanes" with a permuted x.

Why: the straightforward decoders (rows.py) widen bytes to 32-bit lanes with byte->dword
shuffles (vpmovzxbd), which run on few ports and bound Q4/Q5/Q6 matvec at ~8-10 GB/s. Here the
quant bytes are loaded as 32-bit lanes and every field is taken with a shift + mask inside its
lane (cheap ALU ops): lane k, byte s, field f of a load holds some element e(k, s, f). A dot
product does not care about element order, so x is permuted once per call (x_perm = x[PERM])
to put x[e(k, s, f)] at the position the lane reads. ~20% faster on both AVX2 and AVX-512.

Each entry: (decoder, blocks per super-block, perm of one super-block, offset groups per
super-block). Super-blocks of 4 blocks for the 32-element types (4 x 4 dwords = 16 lanes);
the remainder blocks of a row use the rows.py decoder on the identity part of the permutation.
Offsets (Q4_0's -8, Q5_0's -16, Q4_1/Q5_1's m, K-quant mins) use the x group sums, which a
permutation inside the super-block would break, so they are computed from the unpermuted x.
"""
from llvmlite import ir

from .rows import F32, I32, V, Blk, _k_scales, q3k_scales


def _field(e, w, shift, mask, place=0):
    """((w >> shift) & mask) << place on <16 x i32>, with at most one shift and one and."""
    b = e.b
    if shift >= place:
        if shift > place:
            w = b.lshr(w, e.cv(I32, [shift - place] * 16))
        need_and = (shift - place) + (mask << place).bit_length() < 32
    else:
        w = b.shl(w, e.cv(I32, [place - shift] * 16))
        need_and = True
    return b.and_(w, e.cv(I32, [mask << place] * 16)) if need_and else w


def _lanes(e, v, idx):
    return e.shuf(v, idx)


def _bcast4(e, scalars, n_each=4):
    """[s0]*4 + [s1]*4 + [s2]*4 + [s3]*4 as <16 x T> from 4 scalars."""
    t = scalars[0].type
    v = ir.Constant(V(t, 4), None)
    for i, s in enumerate(scalars):
        v = e.b.insert_element(v, s, ir.Constant(I32, i))
    return e.shuf(v, [i // n_each for i in range(4 * n_each)]), v


def _sb32(ts, qs, dm, qh, signed_off):
    """Super-block of 4 32-element blocks (Q4_0/Q4_1/Q5_0/Q5_1). Lane 4i+k = block i, dword k
    of its 16 qs bytes; byte s nibble h holds element 4k + s + 16h of block i."""
    def dec(e, ob):
        obs = [e.at(ob, i * ts) for i in range(4)]
        ws = [e.ld(e.at(o, qs), 4, I32) for o in obs]
        w = e.shuf(e.shuf(ws[0], range(8), ws[1]), range(16), e.shuf(ws[2], range(8), ws[3]))
        dvec, d4 = _bcast4(e, [e.f16(o) for o in obs])
        if dm is None:  # w = d*(q - off): offset term -off*d against the block sums of x
            m4 = e.b.fmul(d4, ir.Constant(V(F32, 4), [-float(signed_off)] * 4))
        else:
            _, m4 = _bcast4(e, [e.f16(e.at(o, dm)) for o in obs])
        if qh is not None:
            qhv, _ = _bcast4(e, [e.ld(e.at(o, qh), 1, I32) for o in obs])
            qhv = e.b.lshr(qhv, e.cv(I32, [4 * (i % 4) for i in range(16)]))
        offs, qs_ = [], []
        for h in range(2):
            for s in range(4):
                q = _field(e, w, 8 * s + 4 * h, 15)
                if qh is not None:
                    q = e.b.or_(q, _field(e, qhv, s + 16 * h, 1, 4))
                offs.append(16 * (4 * h + s))
                qs_.append(e.b.sitofp(q, V(F32, 16)))
        return Blk([(tuple(offs), tuple(qs_), dvec, None)], m4, 1.0)
    perm = [32 * (lane // 4) + 16 * h + 4 * (lane % 4) + s
            for h in range(2) for s in range(4) for lane in range(16)]
    return dec, perm


def _q4_k(e, ob):
    """64 qs bytes = 16 dwords: lanes 0-7 = 32-byte chunk 2p, lanes 8-15 = chunk 2p+1; nibble h
    of byte s of lane k is element 4(k%8)+s of sub-block 2*chunk+h."""
    sv, mv = _k_scales(e, ob)
    groups = []
    for p in range(2):
        w = e.ld(e.at(ob, 16 + 64 * p), 16, I32)
        for h in range(2):
            scale = _lanes(e, sv, [4 * p + h] * 8 + [4 * p + 2 + h] * 8)
            offs = tuple(128 * p + 64 * h + 16 * s for s in range(4))
            groups.append((offs, tuple(e.b.sitofp(_field(e, w, 8 * s + 4 * h, 15), V(F32, 16))
                                       for s in range(4)), scale, None))
    return Blk(groups, mv, -1.0)


def _q5_k(e, ob):
    """As Q4_K plus the 5th bit: bit (2*chunk + h) of qh[4(k%8)+s], qh read as 8 dwords twice."""
    sv, mv = _k_scales(e, ob)
    qhw = _lanes(e, e.ld(e.at(ob, 16), 8, I32), list(range(8)) * 2)
    groups = []
    for p in range(2):
        w = e.ld(e.at(ob, 48 + 64 * p), 16, I32)
        qhl = e.b.lshr(qhw, e.cv(I32, [4 * p] * 8 + [4 * p + 2] * 8))
        for h in range(2):
            scale = _lanes(e, sv, [4 * p + h] * 8 + [4 * p + 2 + h] * 8)
            offs = tuple(128 * p + 64 * h + 16 * s for s in range(4))
            qv = tuple(e.b.sitofp(e.b.or_(_field(e, w, 8 * s + 4 * h, 15), _field(e, qhl, 8 * s + h, 1, 4)),
                                  V(F32, 16)) for s in range(4))
            groups.append((offs, qv, scale, None))
    return Blk(groups, mv, -1.0)


def _perm_k4():
    # Q4_K/Q5_K: position 128p + 64h + 16s + lane <- element 64c + 32h + 4(lane%8) + s
    return [64 * (2 * p + lane // 8) + 32 * h + 4 * (lane % 8) + s
            for p in range(2) for h in range(2) for s in range(4) for lane in range(16)]


def _q6_k(e, ob):
    """Half hh: 64 ql bytes = 16 dwords (lane k, byte s, nibble n -> r = 64n + 4k + s), qh
    bits 2*(r//32) of byte 4(k%8)+s; scale index 8hh + 4n + k//4."""
    sv = e.b.fmul(e.splat(e.f16(e.at(ob, 208)), 16), e.sf(e.ld(e.at(ob, 192), 16)))
    groups = []
    for hh in range(2):
        w = e.ld(e.at(ob, 64 * hh), 16, I32)
        qhw = _lanes(e, e.ld(e.at(ob, 128 + 32 * hh), 8, I32), list(range(8)) * 2)
        qhl = e.b.lshr(qhw, e.cv(I32, [0] * 8 + [2] * 8))
        for n in range(2):
            scale = _lanes(e, sv, [8 * hh + 4 * n + k // 4 for k in range(16)])
            qv = []
            for s in range(4):
                q = e.b.or_(_field(e, w, 8 * s + 4 * n, 15), _field(e, qhl, 8 * s + 4 * n, 3, 4))
                qv.append(e.b.sitofp(e.b.sub(q, e.cv(I32, [32] * 16)), V(F32, 16)))
            groups.append((tuple(128 * hh + 64 * n + 16 * s for s in range(4)), tuple(qv), scale, None))
    return Blk(groups)


def _perm_q6_k():
    return [128 * hh + 64 * n + 4 * k + s for hh in range(2) for n in range(2)
            for s in range(4) for k in range(16)]


def _q2_q3(q3):
    """Q2_K / Q3_K: 64 qs bytes = 16 dwords; lane k, byte s, bit pair j -> element
    128(k//8) + 32j + 4(k%8) + s, scale group 8(k//8) + 2j + (k%8)//4."""
    def dec(e, ob):
        if q3:
            sv = q3k_scales(e, ob)
            hml = e.b.lshr(_lanes(e, e.ld(ob, 8, I32), list(range(8)) * 2), e.cv(I32, [0] * 8 + [4] * 8))
            w = e.ld(e.at(ob, 32), 16, I32)
        else:
            sb = e.ld(ob, 16)
            sv = e.b.fmul(e.splat(e.f16(e.at(ob, 80)), 16), e.uf(e.lo4(sb)))
            mv = e.b.fmul(e.splat(e.f16(e.at(ob, 82)), 16), e.uf(e.hi4(sb)))
            w = e.ld(e.at(ob, 16), 16, I32)
        groups = []
        for j in range(4):
            scale = _lanes(e, sv, [8 * (k // 8) + 2 * j + (k % 8) // 4 for k in range(16)])
            qv = []
            for s in range(4):
                q = _field(e, w, 8 * s + 2 * j, 3)
                if q3:  # q = ql - 4 * (1 - hbit) = (ql | hbit << 2) - 4
                    q = e.b.sub(e.b.or_(q, _field(e, hml, 8 * s + j, 1, 2)), e.cv(I32, [4] * 16))
                qv.append(e.b.sitofp(q, V(F32, 16)))
            groups.append((tuple(64 * j + 16 * s for s in range(4)), tuple(qv), scale, None))
        return Blk(groups) if q3 else Blk(groups, mv, -1.0)
    perm = [128 * (k // 8) + 32 * j + 4 * (k % 8) + s for j in range(4) for s in range(4) for k in range(16)]
    return dec, perm


_q4_0, _p32 = _sb32(18, 2, None, None, 8)
_q4_1, _ = _sb32(20, 4, 2, None, 0)
_q5_0, _ = _sb32(22, 6, None, 2, 16)
_q5_1, _ = _sb32(24, 8, 2, 4, 0)
_q2_k, _p2 = _q2_q3(False)
_q3_k, _ = _q2_q3(True)

# type id -> (decoder, blocks per super-block, super-block permutation, offset groups per SB)
PERM_DECODERS = {
    2: (_q4_0, 4, _p32, 4), 3: (_q4_1, 4, _p32, 4), 6: (_q5_0, 4, _p32, 4), 7: (_q5_1, 4, _p32, 4),
    12: (_q4_k, 1, _perm_k4(), 8), 13: (_q5_k, 1, _perm_k4(), 8), 14: (_q6_k, 1, _perm_q6_k(), 0),
    10: (_q2_k, 1, _p2, 16), 11: (_q3_k, 1, _p2, 0),
}
for _k, (_d, _f, _p, _g) in PERM_DECODERS.items():
    assert sorted(_p) == list(range(len(_p))), _k
