"""Q8_0 and Q4_1 rows with 8-bit activations (blocks of 32 elements; x per 64 / per 32): the
one- and multi-token row kernels for rows_i8.py's tables.  Q8_0 against x + 128 with VNNI's
vpdpbusd, or llama.cpp's sign trick on AVX2 (the same integers); Q4_1's 4-bit q with vpdpbusd
(exact on AVX2 too, x86_int8.py) and its offsets through the exact block sums of x.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils

from .i8_ir import (MULTI_MAX_T, STRICT, _fma, _fn, _hsum_strict, _load, _rows_2d, _store_token_sums,  # noqa: F401
                    _token_accs, _vnni)
from .rows import PREFETCH_BYTES, F32, I8, I16, I32, I64, V, Emit
from .x86_int8 import _PMADDUBSW, _VPDPWSSD, has_vnni


def _q8_0_row(context, builder, e, o_, nb_, token_loop):
    """Walk a Q8_0 row (34-byte blocks: fp16 d | 32 int8 q; w = d q; nb blocks, nb even) against
    x quantized per 64 elements (xu uint8 = xq + 128, xd float32 per 64; drivers_i8.quant_x_u8_64):
        sum w x = sum_p dx_p sum_{b in pair p} d_b (sum q (xq + 128) - 128 sum q).
    One block pair per vpdpbusd (lanes 0-7 the first block, 8-15 the second); the correction
    128 sum q depends on the weights only (one vpdpbusd per pair, shared by all tokens).  Pairs
    are decoded 4 at a time, then token_loop(terms) runs once per token, terms(xu_row, xd_row,
    part) adding those pairs' terms.  The one- and multi-token kernels both walk this way with
    STRICT float operations: batch-invariant.  One x scale per pair: a column share starting on
    a pair boundary quantizes its x as the whole row does (per-64 scales measured ~5% slower
    than per-256 ones; per-32 ones, a second array to load, erased the gain)."""
    vnni = has_vnni()
    zero16 = ir.Constant(V(I32, 16), [0] * 16)
    k128 = builder.bitcast(e.k8(-128, 64), V(I32, 16))  # 0x80 bytes: 128 as the unsigned operand
    if vnni:
        dpbusd = _vnni(builder)
    else:
        maddubs = _fn(builder, _PMADDUBSW, V(I16, 32), [V(I8, 64), V(I8, 64)])
        dpwssd = _fn(builder, _VPDPWSSD, V(I32, 16), [V(I32, 16)] * 3)
        zero8 = ir.Constant(V(I8, 64), [0] * 64)
        ones = builder.bitcast(ir.Constant(V(I16, 32), [1] * 32), V(I32, 16))

    def isum_of(xv, w, corr):
        """<16 x i32>: lane l = sum of w xq over elements 4l .. 4l + 3 of the pair, exactly: VNNI
        vpdpbusd on x + 128 minus the correction; AVX2 (x + 128 would overflow vpmaddubsw's
        int16 pairs) llama.cpp's sign trick, |w| times xq sign(w) (pairs <= 2 * 128 * 127), then
        vpmaddwd: the same integers in the same lanes on both machines."""
        if vnni:
            return builder.sub(builder.call(dpbusd, [zero16, xv, w]), corr)
        wb = builder.bitcast(w, V(I8, 64))
        xq = builder.xor(builder.bitcast(xv, V(I8, 64)), builder.bitcast(k128, V(I8, 64)))  # x + 128 -> x
        neg = builder.icmp_signed("<", wb, zero8)
        aw = builder.select(neg, builder.sub(zero8, wb), wb)
        sx = builder.select(neg, builder.sub(zero8, xq), xq)
        pairs = builder.bitcast(builder.call(maddubs, [aw, sx]), V(I32, 16))
        return builder.call(dpwssd, [zero16, pairs, ones])

    def pair(p):  # block pair p (blocks 2p, 2p + 1) -> (w as <16 x i32>, correction, scales)
        oa = builder.add(o_, builder.mul(p, ir.Constant(I64, 68)))
        ob = builder.add(oa, ir.Constant(I64, 34))
        e.prefetch(e.at(oa, PREFETCH_BYTES))
        w = builder.bitcast(e.cat(e.ld(e.at(oa, 2), 32), e.ld(e.at(ob, 2), 32)), V(I32, 16))
        two = builder.insert_element(builder.insert_element(
            ir.Constant(V(F32, 2), None), e.f16(oa), ir.Constant(I32, 0)), e.f16(ob), ir.Constant(I32, 1))
        corr = builder.call(dpbusd, [zero16, k128, w]) if vnni else None
        return p, w, corr, e.shuf(two, [0] * 8 + [1] * 8)

    def step(ps):  # decode pairs ps once, then every token: their terms summed in registers
        dec = [pair(p) for p in ps]

        def terms(xrow, drow, part):
            for p, w, corr, sv in dec:
                xv = builder.load(builder.bitcast(builder.gep(xrow, [builder.mul(p, ir.Constant(I64, 64))]),
                                                  ir.PointerType(V(I32, 16))))
                xv.align = 1
                isum = isum_of(xv, w, corr)
                dx = builder.load(builder.gep(drow, [p]))
                f = builder.fmul(builder.sitofp(isum, V(F32, 16)), e.splat(dx, 16), flags=STRICT)
                part = _fma(builder, f, sv, part)
            return part
        token_loop(terms)

    npairs = builder.udiv(nb_, ir.Constant(I64, 2))
    nquads = builder.udiv(npairs, ir.Constant(I64, 4))
    with cgutils.for_range(builder, nquads) as ql:  # 4 pairs (256 elements) per pass
        step([builder.add(builder.mul(ql.index, ir.Constant(I64, 4)), ir.Constant(I64, i)) for i in range(4)])
    p0 = builder.mul(nquads, ir.Constant(I64, 4))
    with cgutils.for_range(builder, builder.sub(npairs, p0)) as pl:  # the last 0-3 pairs
        step([builder.add(p0, pl.index)])


_ZERO16F = ir.Constant(V(F32, 16), [0.0] * 16)


def _typer_dot_q8_0(typingctx, flat, o, nb, tab, xu, xd, xs):
    """Q8_0 row (nb blocks, nb even) against one vector quantized per 64 (xu uint8 [n],
    xd float32 [n / 64]; xs unused) -> float32; _q8_0_row's arithmetic."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xua, xda, _ = args
        fty, _, _, tty, xuty, xdty, _ = sig.args
        e = Emit(context, builder, fty, fa, tty, ta)
        xrow = context.make_array(xuty)(context, builder, xua).data
        drow = context.make_array(xdty)(context, builder, xda).data
        acc = cgutils.alloca_once_value(builder, _ZERO16F)

        def token_loop(terms):
            builder.store(builder.fadd(builder.load(acc), terms(xrow, drow, _ZERO16F), flags=STRICT), acc)
        _q8_0_row(context, builder, e, o_, nb_, token_loop)
        return _hsum_strict(e, builder.load(acc))
    return types.float32(flat, types.int64, types.int64, tab, xu, xd, xs), cg


def _typer_dot_multi_q8_0(typingctx, flat, o, nb, tab, xu, xd, xs, out, r, t0, tn):
    """Q8_0 row against the token rows t0 <= t < t0 + tn of xu [T, n] / xd [T, n / 64] -> out[t, r]:
    each pair decoded once for the tn tokens, per token exactly _typer_dot_q8_0's arithmetic.
    Per token and pair: one load, one vpdpbusd, a subtract, a conversion and a multiply-add."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xua, xda, _, outa, r_, t0_, tn_ = args
        fty, _, _, tty, xuty, xdty, _, outty = sig.args[:8]
        e = Emit(context, builder, fty, fa, tty, ta)
        (xus, n), (xds, ndx) = _rows_2d(context, builder, xuty, xua), _rows_2d(context, builder, xdty, xda)
        outs, nout = _rows_2d(context, builder, outty, outa)
        accs = _token_accs(builder, V(F32, 16), tn_)

        def token_loop(terms):
            with cgutils.for_range(builder, tn_) as lt:
                t = builder.add(t0_, lt.index)
                xrow = builder.gep(xus.data, [builder.mul(t, n)])
                drow = builder.gep(xds.data, [builder.mul(t, ndx)])
                ap = builder.gep(accs, [lt.index])
                builder.store(builder.fadd(builder.load(ap), terms(xrow, drow, _ZERO16F), flags=STRICT), ap)
        _q8_0_row(context, builder, e, o_, nb_, token_loop)
        _store_token_sums(e, builder, accs, tn_, t0_, outs, nout, r_)
        return context.get_dummy_value()
    return types.void(flat, types.int64, types.int64, tab, xu, xd, xs, out, types.int64, types.int64,
                      types.int64), cg


def _q4_1_pair(e, builder, o_, ba, nb_):
    """Weight side of Q4_1 blocks ba, ba + 1 (20-byte blocks: d | m | 16 nibble bytes, elements
    0-15 low nibbles, 16-31 high; w = d q + m) -> (q as <16 x i32> for vpdpbusd, d_a, d_b, m_a,
    m_b, has_b).  An odd last block reads its own bytes twice (in bounds); has_b weighs them 0."""
    bb = builder.add(ba, ir.Constant(I64, 1))
    has_b = builder.icmp_unsigned("<", bb, nb_)
    oa = builder.add(o_, builder.mul(ba, ir.Constant(I64, 20)))
    ob = builder.select(has_b, builder.add(oa, ir.Constant(I64, 20)), oa)
    e.prefetch(e.at(oa, PREFETCH_BYTES))
    qa, qb = e.ld(e.at(oa, 4), 16), e.ld(e.at(ob, 4), 16)
    u = builder.bitcast(e.cat(e.cat(e.lo4(qa), e.hi4(qa)), e.cat(e.lo4(qb), e.hi4(qb))), V(I32, 16))
    return u, e.f16(oa), e.f16(ob), e.f16(e.at(oa, 2)), e.f16(e.at(ob, 2)), has_b


def _q4_1_token(e, builder, vnni, w, xv, dxa, dxb, xsa, xsb, acc, macc):
    """One token's share of a Q4_1 block pair: acc (<16 x float>) += (q . xq per block) * d dx,
    macc (float) += m_a X_a + m_b X_b.  Shared by the one- and multi-token kernels, so a token's
    product does not depend on how many tokens share the call (batch invariance)."""
    u, da, db, ma16, mb16, has_b = w
    zero16 = ir.Constant(V(I32, 16), [0] * 16)
    dp = builder.call(vnni, [zero16, u, xv])
    sa = builder.fmul(da, dxa, flags=STRICT)
    sb = builder.select(has_b, builder.fmul(db, dxb, flags=STRICT), ir.Constant(F32, 0.0))
    pair = builder.insert_element(builder.insert_element(ir.Constant(V(F32, 2), None), sa,
                                                         ir.Constant(I32, 0)), sb, ir.Constant(I32, 1))
    sv = e.shuf(pair, [0] * 8 + [1] * 8)
    acc = _fma(builder, builder.sitofp(dp, V(F32, 16)), sv, acc)
    ma = builder.fmul(ma16, xsa, flags=STRICT)
    mb = builder.select(has_b, builder.fmul(mb16, xsb, flags=STRICT), ir.Constant(F32, 0.0))
    return acc, builder.fadd(macc, builder.fadd(ma, mb, flags=STRICT), flags=STRICT)


def _q4_1_quad(e, builder, o_, q):
    """Weight side of Q4_1 blocks 8q .. 8q + 7 (160 bytes) -> (4 block pairs' q as <16 x i32>,
    their d and m as <8 x float>)."""
    ob = builder.add(o_, builder.mul(q, ir.Constant(I64, 160)))
    for k in (0, 64, 128):
        e.prefetch(e.at(ob, PREFETCH_BYTES + k))
    us = []
    for p in range(4):
        qa, qb = e.ld(e.at(ob, 40 * p + 4), 16), e.ld(e.at(ob, 40 * p + 24), 16)
        us.append(builder.bitcast(e.cat(e.cat(e.lo4(qa), e.hi4(qa)), e.cat(e.lo4(qb), e.hi4(qb))), V(I32, 16)))
    d8 = m8 = ir.Constant(V(F32, 8), None)
    for i in range(8):
        d8 = builder.insert_element(d8, e.f16(e.at(ob, 20 * i)), ir.Constant(I32, i))
        m8 = builder.insert_element(m8, e.f16(e.at(ob, 20 * i + 2)), ir.Constant(I32, i))
    return us, d8, m8


def _q4_1_quad_token(e, builder, vnni, w, xvs, dx8, xs8, acc, macc8):
    """One token's share of 8 Q4_1 blocks: acc (<16 x float>) += per block pair (q . xq) * d dx,
    macc8 (<8 x float>) += m X per block.  Shared by the one- and multi-token kernels, so a
    token's product does not depend on how many tokens share the call (batch invariance)."""
    us, d8, m8 = w
    zero16 = ir.Constant(V(I32, 16), [0] * 16)
    s8 = builder.fmul(d8, dx8, flags=STRICT)
    for p in range(4):
        dp = builder.call(vnni, [zero16, us[p], xvs[p]])
        acc = _fma(builder, builder.sitofp(dp, V(F32, 16)), e.shuf(s8, [2 * p] * 8 + [2 * p + 1] * 8), acc)
    return acc, builder.fadd(macc8, builder.fmul(m8, xs8, flags=STRICT), flags=STRICT)


def _vload(builder, data, off, ty, align):
    v = builder.load(builder.bitcast(builder.gep(data, [off]), ir.PointerType(ty)))
    v.align = align
    return v


def _typer_dot_q4_1(typingctx, flat, o, nb, tab, xq, xd, xs):
    """Q4_1 row (nb blocks) against x quantized per 32 elements (xq int8 [>= n + 32, zero
    padded], xd float32 [n/32 + 1]; xs float32 [n/32] exact block sums of x):
        sum w x = sum_b d_b dx_b (sum q xq) + m_b X_b.
    Two blocks per vpdpbusd (lanes 0-7 the first, 8-15 the second), 8 blocks per pass with
    their scales as one vector; the last nb % 8 blocks pair by pair, an odd last block with
    zeros (the padding of xq, and a zero scale)."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xqa, xda, xsa = args
        fty, _, _, tty, xqty, xdty, xsty = sig.args
        e = Emit(context, builder, fty, fa, tty, ta)
        xqd = context.make_array(xqty)(context, builder, xqa).data
        xdd = context.make_array(xdty)(context, builder, xda).data
        xsd = context.make_array(xsty)(context, builder, xsa).data
        acc = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 16), [0.0] * 16))
        macc8 = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 8), [0.0] * 8))
        macc = cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0))
        vnni = _vnni(builder)
        nq = builder.udiv(nb_, ir.Constant(I64, 8))
        with cgutils.for_range(builder, nq) as loop:
            q = loop.index
            w = _q4_1_quad(e, builder, o_, q)
            b0 = builder.mul(q, ir.Constant(I64, 8))
            x0 = builder.mul(b0, ir.Constant(I64, 32))
            xvs = [_vload(builder, xqd, builder.add(x0, ir.Constant(I64, 64 * p)), V(I32, 16), 1) for p in range(4)]
            a, m = _q4_1_quad_token(e, builder, vnni, w, xvs, _vload(builder, xdd, b0, V(F32, 8), 4),
                                    _vload(builder, xsd, b0, V(F32, 8), 4), builder.load(acc), builder.load(macc8))
            builder.store(a, acc)
            builder.store(m, macc8)
        two = ir.Constant(I64, 2)
        bt = builder.mul(nq, ir.Constant(I64, 8))
        ntail = builder.udiv(builder.add(builder.sub(nb_, bt), ir.Constant(I64, 1)), two)
        with cgutils.for_range(builder, ntail) as loop:
            ba = builder.add(bt, builder.mul(loop.index, two))
            w = _q4_1_pair(e, builder, o_, ba, nb_)
            bb = builder.add(ba, ir.Constant(I64, 1))
            xv = _load(builder, context, xqty, xqa, builder.mul(ba, ir.Constant(I64, 32)), V(I32, 16))
            dxa = _load(builder, context, xdty, xda, ba, F32)
            dxb = _load(builder, context, xdty, xda, bb, F32)  # xd has one padding entry
            xsa_ = _load(builder, context, xsty, xsa, ba, F32)
            xsb_ = _load(builder, context, xsty, xsa, builder.select(w[5], bb, ba), F32)
            a, m = _q4_1_token(e, builder, vnni, w, xv, dxa, dxb, xsa_, xsb_, builder.load(acc), builder.load(macc))
            builder.store(a, acc)
            builder.store(m, macc)
        mins = builder.fadd(_hsum_strict(e, builder.load(macc8)), builder.load(macc), flags=STRICT)
        return builder.fadd(_hsum_strict(e, builder.load(acc)), mins, flags=STRICT)
    return types.float32(flat, types.int64, types.int64, tab, xq, xd, xs), cg


def _typer_dot_multi_q4_1(typingctx, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn):
    """Q4_1 row against the token rows t0 <= t < t0 + tn of x quantized as for _typer_dot_q4_1
    (xq int8 [T, n + 32], xd [T, n/32 + 1], xs [T, n/32]) -> out[t, r]: each block decoded
    once for all tn tokens; per token exactly the one-token kernel's arithmetic."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xqa, xda, xsa, outa, r_, t0_, tn_ = args
        fty, _, _, tty, xqty, xdty, xsty, outty = sig.args[:8]
        e = Emit(context, builder, fty, fa, tty, ta)
        (xqs, n), (xds, ndx) = _rows_2d(context, builder, xqty, xqa), _rows_2d(context, builder, xdty, xda)
        (xss, nxs), (outs, nout) = _rows_2d(context, builder, xsty, xsa), _rows_2d(context, builder, outty, outa)
        vnni = _vnni(builder)
        accs = _token_accs(builder, V(F32, 16), tn_)
        macc8s = _token_accs(builder, V(F32, 8), tn_)
        maccs = cgutils.alloca_once(builder, F32, size=MULTI_MAX_T)
        with cgutils.for_range(builder, tn_) as lt:
            builder.store(ir.Constant(F32, 0.0), builder.gep(maccs, [lt.index]))

        def ldf(arr, row_len, t, i):
            return builder.load(builder.gep(arr.data, [builder.add(builder.mul(t, row_len), i)]))

        nq = builder.udiv(nb_, ir.Constant(I64, 8))
        with cgutils.for_range(builder, nq) as loop:
            q = loop.index
            w = _q4_1_quad(e, builder, o_, q)
            b0 = builder.mul(q, ir.Constant(I64, 8))
            x0 = builder.mul(b0, ir.Constant(I64, 32))
            with cgutils.for_range(builder, tn_) as lt:
                t = builder.add(t0_, lt.index)
                xo = builder.add(builder.mul(t, n), x0)
                xvs = [_vload(builder, xqs.data, builder.add(xo, ir.Constant(I64, 64 * p)), V(I32, 16), 1)
                       for p in range(4)]
                dx8 = _vload(builder, xds.data, builder.add(builder.mul(t, ndx), b0), V(F32, 8), 4)
                xs8 = _vload(builder, xss.data, builder.add(builder.mul(t, nxs), b0), V(F32, 8), 4)
                ap, mp = builder.gep(accs, [lt.index]), builder.gep(macc8s, [lt.index])
                a, m = _q4_1_quad_token(e, builder, vnni, w, xvs, dx8, xs8, builder.load(ap), builder.load(mp))
                builder.store(a, ap)
                builder.store(m, mp)
        two = ir.Constant(I64, 2)
        bt = builder.mul(nq, ir.Constant(I64, 8))
        ntail = builder.udiv(builder.add(builder.sub(nb_, bt), ir.Constant(I64, 1)), two)
        with cgutils.for_range(builder, ntail) as loop:
            ba = builder.add(bt, builder.mul(loop.index, two))
            w = _q4_1_pair(e, builder, o_, ba, nb_)
            bb = builder.add(ba, ir.Constant(I64, 1))
            with cgutils.for_range(builder, tn_) as lt:
                t = builder.add(t0_, lt.index)
                off = builder.add(builder.mul(t, n), builder.mul(ba, ir.Constant(I64, 32)))
                xv = _vload(builder, xqs.data, off, V(I32, 16), 1)
                ap, mp = builder.gep(accs, [lt.index]), builder.gep(maccs, [lt.index])
                a, m = _q4_1_token(e, builder, vnni, w, xv, ldf(xds, ndx, t, ba), ldf(xds, ndx, t, bb),
                                   ldf(xss, nxs, t, ba), ldf(xss, nxs, t, builder.select(w[5], bb, ba)),
                                   builder.load(ap), builder.load(mp))
                builder.store(a, ap)
                builder.store(m, mp)
        with cgutils.for_range(builder, tn_) as lt:
            t = builder.add(t0_, lt.index)
            mins = builder.fadd(_hsum_strict(e, builder.load(builder.gep(macc8s, [lt.index]))),
                                builder.load(builder.gep(maccs, [lt.index])), flags=STRICT)
            res = builder.fadd(_hsum_strict(e, builder.load(builder.gep(accs, [lt.index]))), mins, flags=STRICT)
            builder.store(res, builder.gep(outs.data, [builder.add(builder.mul(t, nout), r_)]))
        return context.get_dummy_value()
    return types.void(flat, types.int64, types.int64, tab, xq, xd, xs, out, types.int64, types.int64,
                      types.int64), cg
