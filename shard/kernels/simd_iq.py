"""8-lane vector helpers for dequant_iq.py's decoders, emitted as LLVM vector IR.

Why: numba runs LLVM without the SLP vectorizer (numba.config.SLP_VECTORIZE is 0) and the loop
vectorizer does not touch 8-iteration loops, so `dst[k] = db * grid[gi, k] * sign[si, k]` for
k < 8 stayed eight scalar loads, multiplies and stores.  These intrinsics load the table rows
as <8 x float> / two <4 x float>, multiply (fmul without fast-math flags: the same float32
operations in the same order as gguf-py, so decoding stays bit-exact) and store 8 floats.

    mul8(dst, d0, s, grid, gi, sgn, si):  dst[d0:d0+8] = s * grid[gi, 0:8] * sgn[si, 0:8]
    mul44(dst, d0, s, grid, ga, gb, sgn, si):
        dst[d0:d0+8] = s * concat(grid[ga, 0:4], grid[gb, 0:4]) * sgn[si, 0:8]
    add8(dst, d0, s, grid, gi, delta):    dst[d0:d0+8] = s * (grid[gi, 0:8] + delta)

dst: float32 1-D C array; grid / sgn: float32 2-D C arrays of 8 (mul8, add8) or 4 (mul44) columns;
indices are any integers (not range-checked, as numba's own indexing with boundscheck off).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_F32, _I64 = ir.FloatType(), ir.IntType(64)


def _row(context, builder, arr_ty, arr, idx, idx_ty, n):
    """Pointer to row idx of a C-contiguous float32 2-D array with n columns, as <n x float>*."""
    a = context.make_array(arr_ty)(context, builder, arr)
    i = context.cast(builder, idx, idx_ty, types.int64)
    p = builder.gep(a.data, [builder.mul(i, ir.Constant(_I64, n))])
    return builder.bitcast(p, ir.PointerType(ir.VectorType(_F32, n)))


def _splat(builder, v, n):
    vec = builder.insert_element(ir.Constant(ir.VectorType(_F32, n), None), v, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _store8(context, builder, dst_ty, dst, d0, d0_ty, v):
    a = context.make_array(dst_ty)(context, builder, dst)
    i = context.cast(builder, d0, d0_ty, types.int64)
    p = builder.bitcast(builder.gep(a.data, [i]), ir.PointerType(ir.VectorType(_F32, 8)))
    builder.store(v, p).align = 4


def _fma(builder, a, b, c):
    """a * b + c with one rounding (llvm.fma on <8 x float>): explicit, so it is the same
    instruction wherever the kernel is inlined (no contraction left to LLVM's choice)."""
    ty = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), f"llvm.fma.v{ty.count}f32")
    return builder.call(fn, [a, b, c])


def _load(builder, p):
    v = builder.load(p)
    v.align = 4
    return v


@intrinsic
def mul8(typingctx, dst, d0, s, grid, gi, sgn, si):
    sig = types.void(dst, d0, s, grid, gi, sgn, si)

    def codegen(context, builder, signature, args):
        dst_v, d0_v, s_v, grid_v, gi_v, sgn_v, si_v = args
        t = signature.args
        g = _load(builder, _row(context, builder, t[3], grid_v, gi_v, t[4], 8))
        sg = _load(builder, _row(context, builder, t[5], sgn_v, si_v, t[6], 8))
        s32 = context.cast(builder, s_v, t[2], types.float32)
        v = builder.fmul(builder.fmul(_splat(builder, s32, 8), g), sg)
        _store8(context, builder, t[0], dst_v, d0_v, t[1], v)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def mul44(typingctx, dst, d0, s, grid, ga, gb, sgn, si):
    sig = types.void(dst, d0, s, grid, ga, gb, sgn, si)

    def codegen(context, builder, signature, args):
        dst_v, d0_v, s_v, grid_v, ga_v, gb_v, sgn_v, si_v = args
        t = signature.args
        a = _load(builder, _row(context, builder, t[3], grid_v, ga_v, t[4], 4))
        b = _load(builder, _row(context, builder, t[3], grid_v, gb_v, t[5], 4))
        g = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8))))
        sg = _load(builder, _row(context, builder, t[6], sgn_v, si_v, t[7], 8))
        s32 = context.cast(builder, s_v, t[2], types.float32)
        v = builder.fmul(builder.fmul(_splat(builder, s32, 8), g), sg)
        _store8(context, builder, t[0], dst_v, d0_v, t[1], v)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def add8(typingctx, dst, d0, s, grid, gi, delta):
    sig = types.void(dst, d0, s, grid, gi, delta)

    def codegen(context, builder, signature, args):
        dst_v, d0_v, s_v, grid_v, gi_v, delta_v = args
        t = signature.args
        g = _load(builder, _row(context, builder, t[3], grid_v, gi_v, t[4], 8))
        s32 = context.cast(builder, s_v, t[2], types.float32)
        dl = context.cast(builder, delta_v, t[5], types.float32)
        v = builder.fmul(_splat(builder, s32, 8), builder.fadd(g, _splat(builder, dl, 8)))
        _store8(context, builder, t[0], dst_v, d0_v, t[1], v)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def dot32(typingctx, a, b, n):
    """sum_j a[j] * b[j] over j < n (n a multiple of 32; float32 1-D C arrays) in a fixed order:
    32 lanes (four <8 x float> accumulators, lane k takes j = k mod 32), an explicit fused
    multiply-add per lane (llvm.fma; no fast-math flags), then the lanes added in one fixed tree.  The same
    arithmetic wherever it is inlined (matvec, gathered, fused-experts and batched drivers,
    serial or parallel), so a row's product does not depend on which driver computed it."""
    sig = types.float32(a, b, n)

    def codegen(context, builder, signature, args):
        av, bv, nv = args
        ta, tb, tn = signature.args
        pa = context.make_array(ta)(context, builder, av).data
        pb = context.make_array(tb)(context, builder, bv).data
        n = context.cast(builder, nv, tn, types.int64)
        v8 = ir.VectorType(_F32, 8)
        zero = ir.Constant(v8, [0.0] * 8)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
        count = builder.udiv(n, ir.Constant(_I64, 32))
        with cgutils.for_range(builder, count) as loop:
            base = builder.mul(loop.index, ir.Constant(_I64, 32))
            for q in range(4):
                off = builder.add(base, ir.Constant(_I64, 8 * q))
                xa = _load(builder, builder.bitcast(builder.gep(pa, [off]), ir.PointerType(v8)))
                xb = _load(builder, builder.bitcast(builder.gep(pb, [off]), ir.PointerType(v8)))
                builder.store(_fma(builder, xa, xb, builder.load(accs[q])), accs[q])
        a0, a1, a2, a3 = (builder.load(p) for p in accs)
        s = builder.fadd(builder.fadd(a0, a1), builder.fadd(a2, a3))  # <8 x float>
        for h in (4, 2, 1):  # halves: lanes k and k + h
            lo = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(h))))
            hi = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(h, 2 * h))))
            s = builder.fadd(lo, hi)
        return builder.extract_element(s, ir.Constant(ir.IntType(32), 0))
    return sig, codegen


def _ternary(n: int, kind: str):
    """Intrinsic (dst, d0, d, src, s0, k) writing dst[d0:d0+n] = d * (digit - 1) for the n bytes
    src[s0:s0+n] (uint8 1-D C array), as gguf-py computes TQ2_0 / TQ1_0:
      kind "tq2": digit = (byte >> k) & 3           (k = 0, 2, 4, 6)
      kind "tq1": digit = (uint8(byte * k) * 3) >> 8 (k = 3^p: base-3 digit p)
    in <n x i8/i16> integer lanes, then one int -> float conversion and fmul per lane."""
    i8, i16 = ir.IntType(8), ir.IntType(16)

    def typer(typingctx, dst, d0, d, src, s0, k):
        sig = types.void(dst, d0, d, src, s0, k)

        def codegen(context, builder, signature, args):
            dst_v, d0_v, d_v, src_v, s0_v, k_v = args
            t = signature.args
            ps = context.make_array(t[3])(context, builder, src_v).data
            i = context.cast(builder, s0_v, t[4], types.int64)
            q = _load(builder, builder.bitcast(builder.gep(ps, [i]), ir.PointerType(ir.VectorType(i8, n))))
            k = builder.trunc(context.cast(builder, k_v, t[5], types.int64), i8)
            ks = builder.shuffle_vector(builder.insert_element(ir.Constant(ir.VectorType(i8, n), None), k,
                                                               ir.Constant(ir.IntType(32), 0)),
                                        ir.Constant(ir.VectorType(i8, n), None),
                                        ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))
            if kind == "tq2":
                dig = builder.and_(builder.lshr(q, ks), ir.Constant(ir.VectorType(i8, n), [3] * n))
                dig = builder.zext(dig, ir.VectorType(i16, n))
            else:
                w = builder.zext(builder.mul(q, ks), ir.VectorType(i16, n))  # the uint8 product wraps
                dig = builder.lshr(builder.mul(w, ir.Constant(ir.VectorType(i16, n), [3] * n)),
                                   ir.Constant(ir.VectorType(i16, n), [8] * n))
            v = builder.sub(dig, ir.Constant(ir.VectorType(i16, n), [1] * n))
            f = builder.sitofp(v, ir.VectorType(_F32, n))
            d32 = context.cast(builder, d_v, t[2], types.float32)
            vec = builder.insert_element(ir.Constant(ir.VectorType(_F32, n), None), d32, ir.Constant(ir.IntType(32), 0))
            dv = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))
            out = builder.fmul(dv, f)
            a = context.make_array(t[0])(context, builder, dst_v)
            j = context.cast(builder, d0_v, t[1], types.int64)
            builder.store(out, builder.bitcast(builder.gep(a.data, [j]), ir.PointerType(ir.VectorType(_F32, n)))).align = 4
            return context.get_dummy_value()
        return sig, codegen
    return intrinsic(typer)


tq2_32 = _ternary(32, "tq2")
tq1_32, tq1_16, tq1_4 = _ternary(32, "tq1"), _ternary(16, "tq1"), _ternary(4, "tq1")


def _nibbles(table):
    """Intrinsic (dst, d0, s, src, s0): the 16 bytes src[s0:s0+16] hold 32 4-bit codes, the low
    nibbles first (element j) then the high ones (element 16 + j) as in IQ4_NL / IQ4_XS / MXFP4;
    dst[d0:d0+32] = s * float(table[code]).  The 16-entry int8 table lookup is a tree of 15
    vector selects on the code's bits (portable IR; pshufb is not in baseline x86-64), then one
    int -> float conversion and fmul per lane: gguf-py's float32 d * kvalue."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    vals = [int(v) for v in table]
    assert len(vals) == 16

    def typer(typingctx, dst, d0, s, src, s0):
        sig = types.void(dst, d0, s, src, s0)

        def codegen(context, builder, signature, args):
            dst_v, d0_v, s_v, src_v, s0_v = args
            t = signature.args
            ps = context.make_array(t[3])(context, builder, src_v).data
            i = context.cast(builder, s0_v, t[4], types.int64)
            q = _load(builder, builder.bitcast(builder.gep(ps, [i]), ir.PointerType(ir.VectorType(i8, 16))))
            v16 = ir.VectorType(i8, 16)
            lo = builder.and_(q, ir.Constant(v16, [15] * 16))
            hi = builder.lshr(q, ir.Constant(v16, [4] * 16))
            c = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 32), list(range(32))))  # <32 x i8>
            v32 = ir.VectorType(i8, 32)
            level = [ir.Constant(v32, [vals[k] & 0xFF] * 32) for k in range(16)]
            for bit in range(4):
                m = builder.icmp_unsigned("!=", builder.and_(c, ir.Constant(v32, [1 << bit] * 32)),
                                          ir.Constant(v32, [0] * 32))
                level = [builder.select(m, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
            f = builder.sitofp(level[0], ir.VectorType(_F32, 32))
            s32 = context.cast(builder, s_v, t[2], types.float32)
            vec = builder.insert_element(ir.Constant(ir.VectorType(_F32, 32), None), s32, ir.Constant(i32, 0))
            sv = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, 32), [0] * 32))
            out = builder.fmul(sv, f)
            a = context.make_array(t[0])(context, builder, dst_v)
            j = context.cast(builder, d0_v, t[1], types.int64)
            builder.store(out, builder.bitcast(builder.gep(a.data, [j]), ir.PointerType(ir.VectorType(_F32, 32)))).align = 4
            return context.get_dummy_value()
        return sig, codegen
    return intrinsic(typer)


def _hsum8(builder, s):
    """<8 x float> -> float: halves added in one fixed tree."""
    i32 = ir.IntType(32)
    for h in (4, 2, 1):
        lo = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, h), list(range(h))))
        hi = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, h), list(range(h, 2 * h))))
        s = builder.fadd(lo, hi)
    return builder.extract_element(s, ir.Constant(i32, 0))


@intrinsic
def dot8t(typingctx, buf, X, t0, n, out, r):
    """out[t0 + t, r] = buf[0:n] . X[t0 + t, 0:n] for t < 8 (small batches: the decoded row is
    loaded once per 8 lanes for 8 vectors instead of once per vector).  buf float32 1-D C, X /
    out float32 2-D with contiguous rows; n a multiple of 8; t0 + 8 <= X.shape[0].  Each sum in a
    fixed order (lane k takes j = k mod 8, llvm.fma, one final tree), but not dot32's."""
    sig = types.void(buf, X, t0, n, out, r)

    def codegen(context, builder, signature, args):
        bv, xv, t0v, nv, ov, rv = args
        tb, tx, tt0, tn, to, tr = signature.args
        v8 = ir.VectorType(_F32, 8)
        pb = context.make_array(tb)(context, builder, bv).data
        xa = context.make_array(tx)(context, builder, xv)
        oa = context.make_array(to)(context, builder, ov)
        xs0 = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
        os0 = cgutils.unpack_tuple(builder, oa.strides, 2)[0]
        t0_ = context.cast(builder, t0v, tt0, types.int64)
        n_ = context.cast(builder, nv, tn, types.int64)
        r_ = context.cast(builder, rv, tr, types.int64)
        xbase = builder.bitcast(xa.data, ir.PointerType(ir.IntType(8)))
        rows = [builder.bitcast(builder.gep(xbase, [builder.mul(builder.add(t0_, ir.Constant(_I64, t)), xs0)]),
                                ir.PointerType(_F32)) for t in range(8)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * 8)) for _ in range(8)]
        with cgutils.for_range(builder, builder.udiv(n_, ir.Constant(_I64, 8))) as loop:
            off = builder.mul(loop.index, ir.Constant(_I64, 8))
            w = _load(builder, builder.bitcast(builder.gep(pb, [off]), ir.PointerType(v8)))
            for t in range(8):
                xt = _load(builder, builder.bitcast(builder.gep(rows[t], [off]), ir.PointerType(v8)))
                builder.store(_fma(builder, w, xt, builder.load(accs[t])), accs[t])
        obase = builder.bitcast(oa.data, ir.PointerType(ir.IntType(8)))
        for t in range(8):
            row = builder.gep(obase, [builder.mul(builder.add(t0_, ir.Constant(_I64, t)), os0)])
            p = builder.gep(builder.bitcast(row, ir.PointerType(_F32)), [r_])
            builder.store(_hsum8(builder, builder.load(accs[t])), p)
        return context.get_dummy_value()
    return sig, codegen
