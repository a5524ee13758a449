"""Explicit SIMD block dot products as numba intrinsics (LLVM vector IR).

Why: numba/LLVM fully unrolls the 16- or 32-iteration loops inside one quant block and then
emits scalar int->float conversions (or gathers), ~1.4 GB/s per core for Q4_1. Emitting the
vector IR ourselves (load <16 x i8>, mask/shift, uitofp/sitofp to <N x float>, fmul with x,
tree-reduce) gives AVX2/AVX-512 code whatever the loop shape around it.

All functions read raw bytes at flat[o:] (1-D uint8 array) and float32 x at x[xo:], and return
a float32 partial dot product. No bounds checks: callers guarantee the ranges are in bounds.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _ptr(context, builder, arrty, arr, off, elem, n):
    """Pointer to <n x elem> at arr.data + off (elements of the array's dtype)."""
    a = context.make_array(arrty)(context, builder, arr)
    p = builder.gep(a.data, [off])
    return builder.bitcast(p, ir.PointerType(ir.VectorType(elem, n)))


def _load(context, builder, arrty, arr, off, elem, n):
    ld = builder.load(_ptr(context, builder, arrty, arr, off, elem, n))
    ld.align = 1
    return ld


def _splat(v, n):
    return ir.Constant(ir.VectorType(v.type, n), [v] * n)


def _hsum(builder, v, n):
    """Tree reduction of a <n x float> to a scalar (reassociation is what we want here)."""
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _nibbles(builder, q, n, high):
    if high:
        q = builder.lshr(q, _splat(ir.Constant(_I8, 4), n))
    else:
        q = builder.and_(q, _splat(ir.Constant(_I8, 15), n))
    return builder.uitofp(q, ir.VectorType(_F32, n))


def _sig(typingctx, flat, x):
    return types.float32(flat, types.int64, x, types.int64)


@intrinsic
def dot_u4x32(typingctx, flat, o, x, xo):
    """16 bytes at flat[o:]: low nibbles are elements 0..15, high nibbles 16..31 (Q4_0/Q4_1/
    Q5 layout). Returns sum_j q_j * x[xo + j] over the 32 unsigned nibble values."""
    def cg(context, builder, sig, args):
        fa, o_, xa, xo_ = args
        q = _load(context, builder, sig.args[0], fa, o_, _I8, 16)
        xl = _load(context, builder, sig.args[2], xa, xo_, _F32, 16)
        xh = _load(context, builder, sig.args[2], xa, builder.add(xo_, ir.Constant(xo_.type, 16)), _F32, 16)
        s = builder.fadd(builder.fmul(_nibbles(builder, q, 16, False), xl),
                         builder.fmul(_nibbles(builder, q, 16, True), xh))
        return _hsum(builder, s, 16)
    return _sig(typingctx, flat, x), cg


@intrinsic
def dot_i8x32(typingctx, flat, o, x, xo):
    """32 signed bytes at flat[o:] dot x[xo:xo+32] (Q8_0)."""
    def cg(context, builder, sig, args):
        fa, o_, xa, xo_ = args
        q = _load(context, builder, sig.args[0], fa, o_, _I8, 32)
        xv = _load(context, builder, sig.args[2], xa, xo_, _F32, 32)
        return _hsum(builder, builder.fmul(builder.sitofp(q, ir.VectorType(_F32, 32)), xv), 32)
    return _sig(typingctx, flat, x), cg


def _nib32(high):
    def typer(typingctx, flat, o, x, xo):
        def cg(context, builder, sig, args):
            fa, o_, xa, xo_ = args
            q = _load(context, builder, sig.args[0], fa, o_, _I8, 32)
            xv = _load(context, builder, sig.args[2], xa, xo_, _F32, 32)
            return _hsum(builder, builder.fmul(_nibbles(builder, q, 32, high), xv), 32)
        return _sig(typingctx, flat, x), cg
    return typer


# 32 bytes at flat[o:], low (resp. high) nibbles dot x[xo:xo+32] (Q4_K/Q5_K sub-blocks).
dot_lo4x32 = intrinsic(_nib32(False))
dot_hi4x32 = intrinsic(_nib32(True))


@intrinsic
def dot_bit32(typingctx, flat, o, shift, x, xo):
    """32 bytes at flat[o:]: bit `shift` of each byte dot x[xo:xo+32] (Q5_K high bits)."""
    def cg(context, builder, sig, args):
        fa, o_, sh, xa, xo_ = args
        q = _load(context, builder, sig.args[0], fa, o_, _I8, 32)
        shv = builder.trunc(sh, _I8)
        shv = builder.insert_element(ir.Constant(ir.VectorType(_I8, 32), None), shv, ir.Constant(_I32, 0))
        shv = builder.shuffle_vector(shv, shv, ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        b = builder.and_(builder.lshr(q, shv), _splat(ir.Constant(_I8, 1), 32))
        xv = _load(context, builder, sig.args[3], xa, xo_, _F32, 32)
        return _hsum(builder, builder.fmul(builder.uitofp(b, ir.VectorType(_F32, 32)), xv), 32)
    return types.float32(flat, types.int64, types.int64, x, types.int64), cg


@intrinsic
def dot_qh32(typingctx, flat, o, x, xo):
    """Little-endian uint32 at flat[o:]; bit j is element j's 5th bit (Q5_0/Q5_1).
    Returns sum_j bit_j * x[xo + j] over 32 elements."""
    def cg(context, builder, sig, args):
        fa, o_, xa, xo_ = args
        p = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, fa).data, [o_]),
                            ir.PointerType(_I32))
        qh = builder.load(p)
        qh.align = 1
        v = builder.insert_element(ir.Constant(ir.VectorType(_I32, 32), None), qh, ir.Constant(_I32, 0))
        v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        b = builder.and_(builder.lshr(v, ir.Constant(ir.VectorType(_I32, 32), list(range(32)))),
                         _splat(ir.Constant(_I32, 1), 32))
        xv = _load(context, builder, sig.args[2], xa, xo_, _F32, 32)
        return _hsum(builder, builder.fmul(builder.uitofp(b, ir.VectorType(_F32, 32)), xv), 32)
    return _sig(typingctx, flat, x), cg


@intrinsic
def dot_q6x16(typingctx, flat, oql, sql, oqh, sqh, x, xo):
    """Q6_K: 16 elements with 6-bit value ((ql >> sql) & 15) | (((qh >> sqh) & 3) << 4), ql bytes
    at flat[oql:], qh bytes at flat[oqh:]; returns sum_j (q_j - 32) * x[xo + j]."""
    def cg(context, builder, sig, args):
        fa, oql_, sql_, oqh_, sqh_, xa, xo_ = args
        n = 16
        vt = ir.VectorType(_I8, n)

        def bcast(s):
            s = builder.trunc(s, _I8)
            v = builder.insert_element(ir.Constant(vt, None), s, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), [0] * n))
        ql = _load(context, builder, sig.args[0], fa, oql_, _I8, n)
        qh = _load(context, builder, sig.args[0], fa, oqh_, _I8, n)
        lo = builder.and_(builder.lshr(ql, bcast(sql_)), _splat(ir.Constant(_I8, 15), n))
        hi = builder.and_(builder.lshr(qh, bcast(sqh_)), _splat(ir.Constant(_I8, 3), n))
        q = builder.or_(lo, builder.shl(hi, _splat(ir.Constant(_I8, 4), n)))
        q = builder.sub(q, _splat(ir.Constant(_I8, 32), n))
        xv = _load(context, builder, sig.args[5], xa, xo_, _F32, n)
        return _hsum(builder, builder.fmul(builder.sitofp(q, ir.VectorType(_F32, n)), xv), n)
    return types.float32(flat, types.int64, types.int64, types.int64, types.int64, x, types.int64), cg


@intrinsic
def row_q4_1_simd(typingctx, flat, o, nb, tab, x, xs):
    """Whole Q4_1 row (nb blocks of 20 B: d | m | qs[16]) dot x, with 16-lane vector
    accumulators carried across blocks (one horizontal sum per row instead of per block):
    acc += d * (lo * x[32b:32b+16] + hi * x[32b+16:32b+32]); msum += m * xs[b]."""
    def cg(context, builder, sig, args):
        fa, o_, nb_, ta, xa, xsa = args
        fty, _, _, tty, xty, xsty = sig.args
        vf = ir.VectorType(_F32, 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16))
        msum = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        fdata = context.make_array(fty)(context, builder, fa).data
        tdata = context.make_array(tty)(context, builder, ta).data
        xsdata = context.make_array(xsty)(context, builder, xsa).data
        i64 = o_.type

        def f16at(off):
            p = builder.bitcast(builder.gep(fdata, [off]), ir.PointerType(ir.IntType(16)))
            h = builder.load(p)
            h.align = 1
            return builder.load(builder.gep(tdata, [builder.zext(h, i64)]))
        with cgutils.for_range(builder, nb_) as loop:
            b = loop.index
            ob = builder.add(o_, builder.mul(b, ir.Constant(i64, 20)))
            d = f16at(ob)
            m = f16at(builder.add(ob, ir.Constant(i64, 2)))
            q = _load(context, builder, fty, fa, builder.add(ob, ir.Constant(i64, 4)), _I8, 16)
            xo = builder.mul(b, ir.Constant(i64, 32))
            xl = _load(context, builder, xty, xa, xo, _F32, 16)
            xh = _load(context, builder, xty, xa, builder.add(xo, ir.Constant(i64, 16)), _F32, 16)
            s = builder.fadd(builder.fmul(_nibbles(builder, q, 16, False), xl),
                             builder.fmul(_nibbles(builder, q, 16, True), xh), flags=("fast",))
            dv = builder.insert_element(ir.Constant(vf, None), d, ir.Constant(_I32, 0))
            dv = builder.shuffle_vector(dv, dv, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(dv, s, flags=("fast",)),
                                       flags=("fast",)), acc)
            xsb = builder.load(builder.gep(xsdata, [b]))
            builder.store(builder.fadd(builder.load(msum), builder.fmul(m, xsb)), msum)
        return builder.fadd(_hsum(builder, builder.load(acc), 16), builder.load(msum))
    return types.float32(flat, types.int64, types.int64, tab, x, xs), cg
