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

from .blocks_ir import F32, I8, I32, V, Blk, _k_scales, q3k_scales


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


def _masked(e, w, pos, bits):
    """Field of `bits` bits at bit `pos` of each i32 lane, as float, NOT shifted down: returns
    (float vector = field * 2**k, k). Saves the shift per field; the 2**-k is folded into the
    permuted x (exact: power-of-two scaling). A field touching the sign bit is shifted by 4."""
    if pos + bits > 31:
        w = e.b.lshr(w, e.cv(I32, [4] * 16))
        pos -= 4
    q = e.b.and_(w, e.cv(I32, [((1 << bits) - 1) << pos] * 16))
    return e.b.sitofp(q, V(F32, 16)), pos


def _shr(e, w, k):
    return e.b.lshr(w, e.cv(I32, [k] * 16)) if k > 0 else (e.b.shl(w, e.cv(I32, [-k] * 16)) if k < 0 else w)


def _comb(e, a, ash, amask, b, bsh, bmask):
    """((a >> ash) & amask) | ((b >> bsh) & bmask): one small field per byte of every lane, so
    each of the 4 bytes is then taken with a single and (_masked with pos 8s)."""
    ma = e.b.and_(_shr(e, a, ash), e.cv(I32, [amask] * 16))
    return e.b.or_(ma, e.b.and_(_shr(e, b, bsh), e.cv(I32, [bmask] * 16)))


def nib_exp(s, h):
    """Exponent k of _masked(nibble h of byte s)."""
    pos = 8 * s + 4 * h
    return pos - 4 if pos + 4 > 31 else pos


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
        if qh is not None:  # byte s of lane 4i+k needs bit 4k+s+16h of block i's qh, as 0/16
            qhv, _ = _bcast4(e, [e.ld(e.at(o, qh), 1, I32) for o in obs])
            qb = e.b.bitcast(qhv, V(I8, 64))  # 16-byte group i = 4 copies of qh_i
            spread = []
            for h in range(2):  # in-group byte shuffle (pshufb) to qh byte (k//2 + 2h), test bit
                src = [16 * (L // 16) + ((L % 16) // 4) // 2 + 2 * h for L in range(64)]
                bit = e.cv(I8, [1 << (4 * (((L % 16) // 4) % 2) + L % 4) for L in range(64)])
                hit = e.b.icmp_unsigned("!=", e.b.and_(e.shuf(qb, src), bit), e.k8(0, 64))
                hb = e.b.bitcast(e.b.select(hit, e.k8(16, 64), e.k8(0, 64)), V(I32, 16))
                # nibble h of byte s at 8s, its 5th bit at 8s + 4: 5-bit fields per byte
                spread.append(e.b.or_(e.b.and_(_shr(e, w, 4 * h), e.cv(I32, [0x0F0F0F0F] * 16)), hb))
        offs, qs_ = [], []
        for h in range(2):
            for s in range(4):
                if qh is None:
                    qs_.append(_masked(e, w, 8 * s + 4 * h, 4)[0])
                else:
                    qs_.append(_masked(e, spread[h], 8 * s, 5)[0])
                offs.append(16 * (4 * h + s))
        return Blk([(tuple(offs), tuple(qs_), dvec, None)], m4, 1.0)
    perm = [32 * (lane // 4) + 16 * h + 4 * (lane % 4) + s
            for h in range(2) for s in range(4) for lane in range(16)]
    exps = [nib_exp(s, h) if qh is None else 8 * s for h in range(2) for s in range(4) for lane in range(16)]
    return dec, perm, exps


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
            groups.append((offs, tuple(_masked(e, w, 8 * s + 4 * h, 4)[0] for s in range(4)), scale, None))
    return Blk(groups, mv, -1.0)


def _q5_k(e, ob):
    """As Q4_K plus the 5th bit: bit (2*chunk + h) of qh[4(k%8)+s], qh read as 8 dwords twice."""
    sv, mv = _k_scales(e, ob)
    qhw = _lanes(e, e.ld(e.at(ob, 16), 8, I32), list(range(8)) * 2)
    groups = []
    for p in range(2):
        w = e.ld(e.at(ob, 48 + 64 * p), 16, I32)
        qhl = e.b.lshr(qhw, e.cv(I32, [4 * p] * 8 + [4 * p + 2] * 8))  # bit (s, h) at 8s + h
        for h in range(2):
            scale = _lanes(e, sv, [4 * p + h] * 8 + [4 * p + 2 + h] * 8)
            offs = tuple(128 * p + 64 * h + 16 * s for s in range(4))
            comb = _comb(e, w, 4 * h, 0x0F0F0F0F, qhl, h - 4, 0x10101010)  # 5-bit fields at 8s
            qv = tuple(_masked(e, comb, 8 * s, 5)[0] for s in range(4))
            groups.append((offs, qv, scale, None))
    return Blk(groups, mv, -1.0)


def _perm_k4():
    # Q4_K/Q5_K: position 128p + 64h + 16s + lane <- element 64c + 32h + 4(lane%8) + s
    return [64 * (2 * p + lane // 8) + 32 * h + 4 * (lane % 8) + s
            for p in range(2) for h in range(2) for s in range(4) for lane in range(16)]


_EXP_Q4_K = [nib_exp(s, h) for p in range(2) for h in range(2) for s in range(4) for lane in range(16)]
_EXP_Q5_K = [8 * s for p in range(2) for h in range(2) for s in range(4) for lane in range(16)]


def _q6_k(e, ob):
    """Half hh: 64 ql bytes = 16 dwords (lane k, byte s, nibble n -> r = 64n + 4k + s), qh
    bits 2*(r//32) of byte 4(k%8)+s; scale index 8hh + 4n + k//4."""
    sv = e.b.fmul(e.splat(e.f16(e.at(ob, 208)), 16), e.sf(e.ld(e.at(ob, 192), 16)))
    groups = []
    for hh in range(2):
        w = e.ld(e.at(ob, 64 * hh), 16, I32)
        qhw = _lanes(e, e.ld(e.at(ob, 128 + 32 * hh), 8, I32), list(range(8)) * 2)
        # qh pair (s, n) at bit 8s + 4n after the per-half shift; nibble n of byte s moved to
        # 8s (w >> 4 for n = 1) and its pair to 8s + 4 (qhl << 4 for n = 0): 6 bits at 8s
        qhl = e.b.lshr(qhw, e.cv(I32, [0] * 8 + [2] * 8))
        for n in range(2):
            scale = _lanes(e, sv, [8 * hh + 4 * n + k // 4 for k in range(16)])
            comb = _comb(e, w, 4 * n, 0x0F0F0F0F, qhl, 4 * n - 4, 0x30303030)  # 6-bit fields at 8s
            qv = tuple(_masked(e, comb, 8 * s, 6)[0] for s in range(4))
            groups.append((tuple(128 * hh + 64 * n + 16 * s for s in range(4)), qv, scale, None))
    # the -32 of every 6-bit value: offset -32 * (d * sc) per 16-element group against x sums
    return Blk(groups, e.b.fmul(sv, ir.Constant(V(F32, 16), [-32.0] * 16)), 1.0)


def _perm_q6_k():
    return [128 * hh + 64 * n + 4 * k + s for hh in range(2) for n in range(2)
            for s in range(4) for k in range(16)]


_EXP_Q6_K = [8 * s for hh in range(2) for n in range(2) for s in range(4) for k in range(16)]


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
            if q3:  # q = ql - 4 * (1 - hbit) = (ql | hbit << 2) - 4; the -4 is an offset term
                comb = _comb(e, w, 2 * j, 0x03030303, hml, j - 2, 0x04040404)  # 3-bit fields at 8s
                qv = tuple(_masked(e, comb, 8 * s, 3)[0] for s in range(4))
            else:
                qv = tuple(_masked(e, w, 8 * s + 2 * j, 2)[0] for s in range(4))
            groups.append((tuple(64 * j + 16 * s for s in range(4)), qv, scale, None))
        if q3:
            return Blk(groups, e.b.fmul(sv, ir.Constant(V(F32, 16), [-4.0] * 16)), 1.0)
        return Blk(groups, mv, -1.0)
    perm = [128 * (k // 8) + 32 * j + 4 * (k % 8) + s for j in range(4) for s in range(4) for k in range(16)]
    pos = [8 * s + 2 * j for j in range(4) for s in range(4) for k in range(16)]
    exps = [8 * s if q3 else (p - 4 if p + 2 > 31 else p)
            for p, s in zip(pos, [s for j in range(4) for s in range(4) for k in range(16)])]
    return dec, perm, exps


_q4_0, _p32, _e4 = _sb32(18, 2, None, None, 8)
_q4_1, _, _ = _sb32(20, 4, 2, None, 0)
_q5_0, _, _e5 = _sb32(22, 6, None, 2, 16)
_q5_1, _, _ = _sb32(24, 8, 2, 4, 0)
_q2_k, _p2, _e2 = _q2_q3(False)
_q3_k, _, _e3 = _q2_q3(True)

# type id -> (decoder, blocks per super-block, super-block permutation, offset groups per SB,
#             per-position exponent k: x_perm[i] = x[perm[i]] * 2**-k)
PERM_DECODERS = {
    2: (_q4_0, 4, _p32, 4, _e4), 3: (_q4_1, 4, _p32, 4, _e4), 6: (_q5_0, 4, _p32, 4, _e5),
    7: (_q5_1, 4, _p32, 4, _e5), 12: (_q4_k, 1, _perm_k4(), 8, _EXP_Q4_K),
    13: (_q5_k, 1, _perm_k4(), 8, _EXP_Q5_K), 14: (_q6_k, 1, _perm_q6_k(), 16, _EXP_Q6_K),
    10: (_q2_k, 1, _p2, 16, _e2), 11: (_q3_k, 1, _p2, 16, _e3),
}
for _k, (_d, _f, _p, _g, _x) in PERM_DECODERS.items():
    assert sorted(_p) == list(range(len(_p))) and len(_x) == len(_p), _k
