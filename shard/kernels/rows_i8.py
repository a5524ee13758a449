"""Q4_K, Q5_K, Q6_K, Q4_1 and Q8_0 rows with 8-bit activations and integer dot products.

Why: the float kernels (rows.py / rows_perm.py) turn every 4-bit weight into a float and
multiply it by x, compute-bound at ~12 GB/s per thread for Q4_K here. llama.cpp quantizes x once
per product to 8 bits (one float scale per 256 elements, "Q8_K") and multiplies integers: one
VNNI vpdpbusd does 64 such products, summed in groups of 4 into 16 int32 lanes.

Per Q4_K super-block (256 elements, 144 bytes: d | dmin | 12 scale bytes | 128 nibble bytes):
    sum_i w_i x_i = d * dx * sum_j sc_j * (sum_{i in sub-block j} q_i xq_i)  -  dmin * sum_j mn_j * X_j
with dx the scale of the 256 elements, xq = round(x / dx), X_j the exact float sum of x over
sub-block j (only the first term carries the activation rounding).  The integer part stays in
int32 lanes (|q xq| <= 15 * 127, times sc <= 63, 64 terms per lane) and is converted once.  Q5_K: 5-bit q (<= 31); Q6_K: signed 16-element scales and q - 32; Q4_1: a float scale
and offset per 32; Q8_0: x per 64 (_q8_0_row).  VNNI: vpdpbusd / vpmaddubsw / vpdpwssd on
512-bit vectors; AVX2 only: the same calls from vpmaddubsw + vpmaddwd on 256-bit halves
(x86_int8.py), bit-identical integer sums.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils

from .x86_int8 import _PMADDUBSW, _VPDPBUSD, _VPDPWSSD, has_avx2_int8, has_vnni, intrinsic  # noqa: F401
from .rows import PREFETCH_BYTES, F32, I8, I16, I32, I64, FAST, V, Emit, _by_kind, _hsum, k_scales_int


def _load(builder, context, arrty, arr, off, ty):
    a = context.make_array(arrty)(context, builder, arr)
    v = builder.load(builder.bitcast(builder.gep(a.data, [off]), ir.PointerType(ty)))
    v.align = 1
    return v


def _vnni(builder):
    return _fn(builder, _VPDPBUSD, V(I32, 16), [V(I32, 16)] * 3)


def _fn(builder, name, ret, args):
    return intrinsic(builder, name, ret, args)


def _k_values(e, builder, ob, q5: bool):
    """The 4 chunks of 64 unsigned values of a Q4_K (144 B: d | dmin | scales[12] | qs[128]) or
    Q5_K (176 B: ... | qh[32] | qs[128]; bit s of qh[l] is the 5th bit of sub-block s) super-block
    at byte ob: chunk c = sub-block 2c (low nibbles) then 2c+1 (high nibbles), <64 x i8>."""
    us = []
    qh = e.ld(e.at(ob, 16), 32) if q5 else None
    for c in range(4):
        q = e.ld(e.at(ob, (48 if q5 else 16) + 32 * c), 32)
        lo, hi = e.lo4(q), e.hi4(q)
        if q5:
            lo = builder.or_(lo, builder.shl(e.bits(qh, 2 * c, 1), e.k8(4, 32)))
            hi = builder.or_(hi, builder.shl(e.bits(qh, 2 * c + 1, 1), e.k8(4, 32)))
        us.append(e.cat(lo, hi))
    return us


def _q6k_values(e, builder, ob):
    """The 4 chunks of 64 six-bit values (unsigned, <64 x i8>) of a Q6_K super-block at byte ob
    (210 B: ql[128] | qh[64] | int8 scales[16] | d; w = d * sc_k * (q - 32)) and its scales
    (<16 x i8>).  Per half h of 128: elements 0-31 / 32-63 / 64-95 / 96-127 are ql[0:32] low,
    ql[32:64] low, ql[0:32] high, ql[32:64] high nibbles, with qh bits 0-1 / 2-3 / 4-5 / 6-7 on
    top: file order, so x needs no reordering."""
    us = []
    for h in range(2):
        ql0, ql1 = e.ld(e.at(ob, 64 * h), 32), e.ld(e.at(ob, 64 * h + 32), 32)
        qh = e.ld(e.at(ob, 128 + 32 * h), 32)
        qs = [builder.or_(lo, builder.shl(e.bits(qh, 2 * k, 3), e.k8(4, 32)))
              for k, lo in enumerate((e.lo4(ql0), e.lo4(ql1), e.hi4(ql0), e.hi4(ql1)))]
        us += [e.cat(qs[0], qs[1]), e.cat(qs[2], qs[3])]
    return us, e.ld(e.at(ob, 192), 16)


def _pair_scales(builder, e, sc16, per: int):
    """int16 scales -> per chunk c of 64 values the <32 x i16> (as <16 x i32>) vpdpwssd operand:
    value pair m of the chunk gets scale sc16[(64 c + 2 m) // per] (per = elements per scale)."""
    return [builder.bitcast(e.shuf(sc16, [(64 * c + 2 * m) // per for m in range(32)]), V(I32, 16))
            for c in range(4)]


# Flags of the per-token accumulation: no reassociation and no implicit contraction, so LLVM
# cannot reorder a token's sum differently in the one-token kernels (accumulators in registers)
# and the multi-token ones (accumulators on the stack); multiply-adds are explicit llvm.fma.
STRICT = ("nnan", "ninf", "nsz", "arcp")


def _fma(builder, a, b, c):
    """a * b + c, one rounding (llvm.fma on a vector or scalar float)."""
    ty = a.type
    name = f"llvm.fma.v{ty.count}f32" if isinstance(ty, ir.VectorType) else "llvm.fma.f32"
    return builder.call(_fn(builder, name, ty, [ty] * 3), [a, b, c])


def _hsum_strict(e, v):
    """Horizontal sum of a float vector in a fixed tree (halves added pairwise)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        v = e.b.fadd(e.shuf(v, range(h)), e.shuf(v, range(h, n)), flags=STRICT)
        n = h
    return e.b.extract_element(v, ir.Constant(I32, 0))


def _token_block(e, builder, acc, isum, d, dx, mins):
    """acc (<8 x float>) + one super-block's contribution for one token: the 16 int32 lanes of
    isum folded to 8 (exact), converted, times d * dx, minus the mins term (<8 x float> or None).
    The one-token and the multi-token kernels both call this, so a token's product is the same
    float computation whatever the number of tokens beside it (batch invariance)."""
    isum8 = builder.add(e.shuf(isum, range(8)), e.shuf(isum, range(8, 16)))
    s = builder.fmul(d, dx, flags=STRICT)
    acc = _fma(builder, builder.sitofp(isum8, V(F32, 8)), e.splat(s, 8), acc)
    if mins is not None:
        acc = builder.fsub(acc, mins, flags=STRICT)
    return acc


def _typer_dot_k(q5: bool):
    bb = 176 if q5 else 144

    def typer(typingctx, flat, o, nb, tab, xq, xd, xs):
        """Q4_K / Q5_K row (flat, o, nb super-blocks, fp16 table) against xq int8 [n],
        xd float32 [n/256], xs float32 [n/32] -> float32."""
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xqa, xda, xsa = args
            fty, _, _, tty, xqty, xdty, xsty = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            zero16 = ir.Constant(V(I32, 16), [0] * 16)
            acc = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 8), [0.0] * 8))
            maddubs = _fn(builder, _PMADDUBSW, V(I16, 32), [V(I8, 64), V(I8, 64)])
            dpwssd = _fn(builder, _VPDPWSSD, V(I32, 16), [V(I32, 16)] * 3)
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, bb)))
                e.prefetch(e.at(ob, PREFETCH_BYTES))
                isum = zero16
                x0 = builder.mul(b, ir.Constant(I64, 256))
                # scale the 32-element sub-blocks with vpmaddubsw (q times 8-bit x, pairs in int16:
                # |sum| <= 2 * 31 * 127) + vpdpwssd (times the scales, into int32), as the
                # multi-token kernel does: exact, and a few % faster than vpdpbusd + vpmulld
                sc, mn = k_scales_int(e, ob)
                d = e.f16(ob)
                mv = builder.fmul(e.splat(e.f16(e.at(ob, 2)), 8), e.uf(mn), flags=FAST)
                scp = _pair_scales(builder, e, builder.zext(sc, V(I16, 8)), 32)
                for c, u in enumerate(_k_values(e, builder, ob, q5)):
                    xv = _load(builder, context, xqty, xqa, builder.add(x0, ir.Constant(I64, 64 * c)), V(I8, 64))
                    pairs = builder.bitcast(builder.call(maddubs, [u, xv]), V(I32, 16))
                    isum = builder.call(dpwssd, [isum, pairs, scp[c]])
                xsv = _load(builder, context, xsty, xsa, builder.mul(b, ir.Constant(I64, 8)), V(F32, 8))
                mins = builder.fmul(mv, xsv, flags=STRICT)
                dx = _load(builder, context, xdty, xda, b, F32)
                builder.store(_token_block(e, builder, builder.load(acc), isum, d, dx, mins), acc)
            return _hsum_strict(e, builder.load(acc))
        return types.float32(flat, types.int64, types.int64, tab, xq, xd, xs), cg
    return typer


def _typer_dot_q6k(typingctx, flat, o, nb, tab, xq, xd, xb):
    """Q6_K row against x quantized per 256 elements (xq int8 [n], xd float32 [n/256]) with
    xb int32 [n/16] the integer sums of xq over 16 elements (llama.cpp's Q8_K bsums):
        sum w x = sum_b d_b dx_b sum_k sc_k (sum_{i in k} q_i xq_i - 32 xb_k).
    The 6-bit q (0..63) are unsigned bytes for vpmaddubsw (pair sums <= 2 * 63 * 127, within
    int16), then vpdpwssd multiplies by the 16-element group scales."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xqa, xda, xba = args
        fty, _, _, tty, xqty, xdty, xbty = sig.args
        e = Emit(context, builder, fty, fa, tty, ta)
        maddubs = _fn(builder, _PMADDUBSW, V(I16, 32), [V(I8, 64), V(I8, 64)])
        dpwssd = _fn(builder, _VPDPWSSD, V(I32, 16), [V(I32, 16)] * 3)
        acc = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 8), [0.0] * 8))
        with cgutils.for_range(builder, nb_) as loop:
            b = loop.index
            ob = builder.add(o_, builder.mul(b, ir.Constant(I64, 210)))
            e.prefetch(e.at(ob, PREFETCH_BYTES))
            us, sc8 = _q6k_values(e, builder, ob)
            scvs = _pair_scales(builder, e, builder.sext(sc8, V(I16, 16)), 16)
            x0 = builder.mul(b, ir.Constant(I64, 256))
            isum = ir.Constant(V(I32, 16), [0] * 16)
            for c in range(4):
                xv = _load(builder, context, xqty, xqa, builder.add(x0, ir.Constant(I64, 64 * c)), V(I8, 64))
                pairs = builder.bitcast(builder.call(maddubs, [us[c], xv]), V(I32, 16))
                isum = builder.call(dpwssd, [isum, pairs, scvs[c]])
            xbv = _load(builder, context, xbty, xba, builder.mul(b, ir.Constant(I64, 16)), V(I32, 16))
            off = builder.shl(builder.mul(builder.sext(sc8, V(I32, 16)), xbv), ir.Constant(V(I32, 16), [5] * 16))
            isum = builder.sub(isum, off)
            dx = _load(builder, context, xdty, xda, b, F32)
            builder.store(_token_block(e, builder, builder.load(acc), isum, e.f16(e.at(ob, 208)), dx, None), acc)
        return _hsum_strict(e, builder.load(acc))
    return types.float32(flat, types.int64, types.int64, tab, xq, xd, xb), cg


def _rows_2d(context, builder, ty, val):
    """A 2-D array argument -> (its numba array struct, its row length)."""
    a = context.make_array(ty)(context, builder, val)
    return a, cgutils.unpack_tuple(builder, a.shape, 2)[1]


def _token_accs(builder, vec, tn):
    """tn zeroed float accumulators of type vec on the stack (one per token of a multi-token row)."""
    accs = cgutils.alloca_once(builder, vec, size=MULTI_MAX_T)
    with cgutils.for_range(builder, tn) as lt:
        builder.store(ir.Constant(vec, [0.0] * vec.count), builder.gep(accs, [lt.index]))
    return accs


def _store_token_sums(e, builder, accs, tn, t0, outs, nout, r):
    """out[t0 + i, r] = horizontal sum of accs[i] for i < tn."""
    with cgutils.for_range(builder, tn) as lt:
        t = builder.add(t0, lt.index)
        res = _hsum_strict(e, builder.load(builder.gep(accs, [lt.index])))
        builder.store(res, builder.gep(outs.data, [builder.add(builder.mul(t, nout), r)]))


MULTI_MAX_T = 16  # tokens per call of the multi-token row kernels (accumulators on the stack)


def _typer_dot_multi(kind: str):
    """kind "q4k" / "q5k" / "q6k": out[t, r] = row . x_t for the tn <= 16 token rows
    t0 <= t < t0 + tn of xq [T, n] int8 / xd [T, n/256] / xs (as in the one-token kernels: float
    [T, n/32] x sums for the Q4_K / Q5_K mins, int32 [T, n/16] xq sums for Q6_K's - 32): each
    super-block is decoded once for all tn tokens (batched decode; prompts in 16-token chunks).
    Per token and 64 elements: vpmaddubsw (q times 8-bit x, pairs summed in int16: |sum| <=
    2 * 63 * 127) then vpdpwssd (times the scales, pairs summed into int32): two multiply
    instructions, where vpdpbusd + vpmulld cost three slots (vpmulld is a slow one); ~12% faster
    at T = 8."""
    q6 = kind == "q6k"
    bb = {"q4k": 144, "q5k": 176, "q6k": 210}[kind]

    def typer(typingctx, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn):
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xqa, xda, xsa, outa, r_, t0_, tn_ = args
            fty, _, _, tty, xqty, xdty, xsty, outty = sig.args[:8]
            e = Emit(context, builder, fty, fa, tty, ta)
            (xqs, n), (xds, ndx) = _rows_2d(context, builder, xqty, xqa), _rows_2d(context, builder, xdty, xda)
            (xss, nxs), (outs, nout) = _rows_2d(context, builder, xsty, xsa), _rows_2d(context, builder, outty, outa)
            maddubs = _fn(builder, _PMADDUBSW, V(I16, 32), [V(I8, 64), V(I8, 64)])
            dpwssd = _fn(builder, _VPDPWSSD, V(I32, 16), [V(I32, 16)] * 3)
            # one 8-lane float accumulator per token: the block's 16 int32 lanes are folded to 8
            # before the conversion, and the mins go into the same accumulator (fewer float
            # instructions and accumulator loads / stores per token and block)
            accs = _token_accs(builder, V(F32, 8), tn_)
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, bb)))
                e.prefetch(e.at(ob, PREFETCH_BYTES))
                if q6:
                    us, sc8 = _q6k_values(e, builder, ob)
                    scvs = _pair_scales(builder, e, builder.sext(sc8, V(I16, 16)), 16)
                    sc32 = builder.sext(sc8, V(I32, 16))
                    d = e.f16(e.at(ob, 208))
                else:
                    sc, mn = k_scales_int(e, ob)
                    us = _k_values(e, builder, ob, kind == "q5k")
                    scvs = _pair_scales(builder, e, builder.zext(sc, V(I16, 8)), 32)
                    mv = builder.fmul(e.splat(e.f16(e.at(ob, 2)), 8), e.uf(mn), flags=FAST)
                    d = e.f16(ob)
                x0 = builder.mul(b, ir.Constant(I64, 256))
                with cgutils.for_range(builder, tn_) as lt:
                    t = builder.add(t0_, lt.index)  # token row in xq / out
                    isum = ir.Constant(V(I32, 16), [0] * 16)
                    for c in range(4):
                        off = builder.add(builder.mul(t, n), builder.add(x0, ir.Constant(I64, 64 * c)))
                        xv = builder.load(builder.bitcast(builder.gep(xqs.data, [off]), ir.PointerType(V(I8, 64))))
                        xv.align = 1
                        pairs = builder.bitcast(builder.call(maddubs, [us[c], xv]), V(I32, 16))
                        isum = builder.call(dpwssd, [isum, pairs, scvs[c]])
                    mins = None
                    if q6:  # - 32 * sc_k * (sum of xq over group k)
                        xo = builder.add(builder.mul(t, nxs), builder.mul(b, ir.Constant(I64, 16)))
                        xbp = builder.bitcast(builder.gep(xss.data, [xo]), ir.PointerType(V(I32, 16)))
                        xbv = builder.load(xbp)
                        xbv.align = 4
                        five = ir.Constant(V(I32, 16), [5] * 16)
                        isum = builder.sub(isum, builder.shl(builder.mul(sc32, xbv), five))
                    else:  # the mins: dmin * mn_j * (float sum of x over sub-block j)
                        xo = builder.add(builder.mul(t, nxs), builder.mul(b, ir.Constant(I64, 8)))
                        xsp = builder.bitcast(builder.gep(xss.data, [xo]), ir.PointerType(V(F32, 8)))
                        xsv = builder.load(xsp)
                        xsv.align = 4
                        mins = builder.fmul(mv, xsv, flags=STRICT)
                    dx = builder.load(builder.gep(xds.data, [builder.add(builder.mul(t, ndx), b)]))
                    ap = builder.gep(accs, [lt.index])
                    builder.store(_token_block(e, builder, builder.load(ap), isum, d, dx, mins), ap)
            _store_token_sums(e, builder, accs, tn_, t0_, outs, nout, r_)
            return context.get_dummy_value()
        return types.void(flat, types.int64, types.int64, tab, xq, xd, xs, out, types.int64, types.int64,
                          types.int64), cg
    return typer


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


# The row kernels by GGML type id, chosen at typing time from a literal first argument (the
# drivers are specialised per type with numba.literally, as in drivers.py).
_Q4_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K = 3, 8, 12, 13, 14

# (kind, flat, o, nb, tab, xq, xd, xs) -> float32: one row against one quantized vector
dot_i8_any = _by_kind({_Q4_K: _typer_dot_k(False), _Q5_K: _typer_dot_k(True), _Q6_K: _typer_dot_q6k,
                       _Q4_1: _typer_dot_q4_1, _Q8_0: _typer_dot_q8_0}, "dot_i8_any", 7)
# (kind, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn): one row against tn <= 16 vectors
dot_i8_multi_any = _by_kind({_Q4_K: _typer_dot_multi("q4k"), _Q5_K: _typer_dot_multi("q5k"),
                             _Q6_K: _typer_dot_multi("q6k"), _Q8_0: _typer_dot_multi_q8_0,
                             _Q4_1: _typer_dot_multi_q4_1}, "dot_i8_multi_any", 11)
MULTI_KINDS = (_Q4_K, _Q5_K, _Q6_K, _Q4_1, _Q8_0)
