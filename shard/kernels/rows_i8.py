"""Q4_K, Q5_K, Q6_K, Q4_1 and Q8_0 rows with 8-bit activations and integer dot products.

Why: the float kernels (rows.py / rows_perm.py) turn every 4-bit weight into a float and
multiply it by x, compute-bound at ~12 GB/s per thread for Q4_K here. llama.cpp quantizes x once
per product to 8 bits (one float scale per 256 elements, "Q8_K") and multiplies integers: one
VNNI vpdpbusd does 64 such products, summed in groups of 4 into 16 int32 lanes.

Per Q4_K super-block (256 elements, 144 bytes: d | dmin | 12 scale bytes | 128 nibble bytes):
    sum_i w_i x_i = d * dx * sum_j sc_j * (sum_{i in sub-block j} q_i xq_i)  -  dmin * sum_j mn_j * X_j
with dx the scale of the 256 elements, xq = round(x / dx), X_j the exact float sum of x over
sub-block j (only the first term carries the activation rounding).  The integer part stays in
int32 lanes (|q xq| <= 15 * 127, times sc <= 63, 64 terms per lane) and is converted once.
Q5_K: 5-bit q (<= 31); Q6_K: signed 16-element scales and q - 32; Q4_1 (a float scale and
offset per 32) and Q8_0 (x per 64) in rows_i8_32.py; the shared IR pieces in i8_ir.py.  VNNI:
vpdpbusd / vpmaddubsw / vpdpwssd on 512-bit vectors; AVX2 only: the same calls from vpmaddubsw
+ vpmaddwd on 256-bit halves (x86_int8.py), bit-identical integer sums.  This file holds the
tables by type that the drivers use (dot_i8_any, dot_i8_multi_any).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils

from .x86_int8 import _PMADDUBSW, _VPDPBUSD, _VPDPWSSD, has_avx2_int8, has_vnni, intrinsic  # noqa: F401
from .rows import PREFETCH_BYTES, F32, I8, I16, I32, I64, FAST, V, Emit, _by_kind, _hsum, k_scales_int  # noqa: F401
# the shared IR pieces (re-exported: rows_iq8 / rows_iq1 / drivers_i8 import them from here)
from .i8_ir import (MULTI_MAX_T, STRICT, _fma, _fn, _hsum_strict, _load, _pair_scales, _rows_2d,  # noqa: F401
                    _store_token_sums, _token_accs, _token_block, _vnni)
from .rows_i8_32 import _typer_dot_multi_q4_1, _typer_dot_multi_q8_0, _typer_dot_q4_1, _typer_dot_q8_0


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


def _k_block(e, builder, context, q5, ob, b, xqty, xqa, xdty, xda, xsty, xsa, acc):
    """acc + one Q4_K / Q5_K super-block's contribution (block b at byte ob) for one vector."""
    maddubs = _fn(builder, _PMADDUBSW, V(I16, 32), [V(I8, 64), V(I8, 64)])
    dpwssd = _fn(builder, _VPDPWSSD, V(I32, 16), [V(I32, 16)] * 3)
    isum = ir.Constant(V(I32, 16), [0] * 16)
    x0 = builder.mul(b, ir.Constant(I64, 256))
    # scale the 32-element sub-blocks with vpmaddubsw (q times 8-bit x, pairs in int16:
    # |sum| <= 2 * 31 * 127) + vpdpwssd (times the scales, into int32), as the multi-token
    # kernel does: exact, and a few % faster than vpdpbusd + vpmulld
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
    return _token_block(e, builder, acc, isum, d, dx, mins)


def _typer_dot_k(q5: bool):
    bb = 176 if q5 else 144

    def typer(typingctx, flat, o, nb, tab, xq, xd, xs):
        """Q4_K / Q5_K row (flat, o, nb super-blocks, fp16 table) against xq int8 [n],
        xd float32 [n/256], xs float32 [n/32] -> float32."""
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xqa, xda, xsa = args
            fty, _, _, tty, xqty, xdty, xsty = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            acc = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 8), [0.0] * 8))
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, bb)))
                e.prefetch(e.at(ob, PREFETCH_BYTES))
                builder.store(_k_block(e, builder, context, q5, ob, b, xqty, xqa, xdty, xda, xsty, xsa,
                                       builder.load(acc)), acc)
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
