"""Whole-row SIMD kernels emitted as LLVM vector IR, one block *decoder* per GGML type.

Why IR: numba/LLVM unroll the small loops inside a quant block and then emit scalar int->float
conversions or gathers (1-4 GB/s). Here each type has one decoder that turns a block into
"groups": (element offset in block, q = <16|32 x float> of small exact integers, scale s,
offset m) with dequantized w = s * q (+/-) m, exactly the float32 operations gguf-py performs
(so `deq` rows are bit-exact; the decoders are in blocks_ir.py). Two row drivers are built from every decoder:

  dot_<T>(flat, o, nb, tab, x, xs) -> float32   matvec row: sum_g s_g * (q_g . x_g) on
      16-lane accumulators carried across the whole row (one horizontal sum per row), offsets
      folded in as  (+/-) sum_g m_g * xs[g]  with xs = sums of x over groups (gsz elements).
  deq_<T>(flat, o, nb, tab, dst, d0) -> int64     writes nb * bs float32 to dst[d0:], bit-exact.

flat: 1-D uint8 raw bytes, row starts at flat[o]; nb = blocks in the row; x float32 (ncols,).
Only generic LLVM vector ops are used: the code compiles for any x86-64 (SSE2 baseline,
NUMBA_CPU_NAME=generic) and uses AVX2/AVX-512 when the CPU has them; fp16 bulk conversion uses
`fpext half` only when the target has F16C, else an exact integer bit trick.
"""


from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# decoders and IR helpers (re-exported: rows_i8, rows_iq8, attention and experts import them here)
from .blocks_ir import (DECODERS, F32, FAST, I8, I16, I32, I64, PREFETCH_BYTES, V, Blk, Emit,  # noqa: F401
                        _NAMES, _k_scales, fma, k_scales_int, q3k_scales)
from .rows_perm import PERM_DECODERS


# ---------------------------------------------------------------- row drivers

def _hsum(e, v, flags=FAST):
    """Horizontal sum of a float vector in a fixed tree (halves added pairwise)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        v = e.b.fadd(e.shuf(v, range(h)), e.shuf(v, range(h, n)), flags=flags)
        n = h
    return e.b.extract_element(v, ir.Constant(I32, 0))


def _xptr(context, builder, arrty, arr, off, n):
    a = context.make_array(arrty)(context, builder, arr)
    ld = builder.load(builder.bitcast(builder.gep(a.data, [off]), ir.PointerType(V(F32, n))))
    ld.align = 4
    return ld


def _emit_blocks(context, builder, e, sig, args, accs, count, first, dec, bs, ts, ng, factor):
    """Loop over `count` (super-)blocks of `factor` blocks starting at block `first` of the row;
    accumulate sum_g s_g * (q_g . x_g) into accs; returns the sum of the offset terms
    (accumulated as an ng-lane vector, reduced once after the loop) or None."""
    fa, o_, nb_, ta, xa, xsa = args
    _, _, _, _, xty, xsty = sig.args
    msign = [1.0]
    mt = F32 if ng <= 1 else V(F32, ng)
    macc = cgutils.alloca_once_value(builder, ir.Constant(mt, 0.0 if ng <= 1 else [0.0] * ng))
    with cgutils.for_range(builder, count) as loop:
        b = builder.add(builder.mul(loop.index, ir.Constant(I64, factor)), first)  # block index
        ob = builder.add(o_, builder.mul(b, ir.Constant(I64, ts)))
        e.prefetch(e.at(ob, PREFETCH_BYTES))
        xb = builder.mul(b, ir.Constant(I64, bs))
        blk = dec(e, ob)
        msign[0] = blk.msign
        for i, (eoff, q, s, _m) in enumerate(blk.groups):
            if not isinstance(q, tuple):  # one vector, or several sharing scale s
                eoff, q = (eoff,), (q,)
            t = None
            for eo, qv in zip(eoff, q):
                xv = _xptr(context, builder, xty, xa, e.at(xb, eo), qv.type.count)
                t = builder.fmul(qv, xv, flags=FAST) if t is None else fma(builder, qv, xv, t)
            n = t.type.count
            while n > 16:
                n //= 2
                t = builder.fadd(e.shuf(t, range(n)), e.shuf(t, range(n, 2 * n)), flags=FAST)
            if n < 16:
                t = e.shuf(t, list(range(n)) + [n] * (16 - n), ir.Constant(t.type, [0.0] * n))
            a = accs[i % 2]
            if s is not None:
                sv = s if isinstance(s.type, ir.VectorType) else e.splat(s, 16)
                builder.store(fma(builder, sv, t, builder.load(a)), a)
            else:
                builder.store(builder.fadd(builder.load(a), t, flags=FAST), a)
        if ng:
            xsd = context.make_array(xsty)(context, builder, xsa).data
            # offsets per block: block b's groups are xs[b*ng/factor ...], contiguous
            xo = builder.mul(b, ir.Constant(I64, ng // factor))
            if ng > 1:
                xsv = builder.load(builder.bitcast(builder.gep(xsd, [xo]), ir.PointerType(V(F32, ng))))
                xsv.align = 4
            else:
                xsv = builder.load(builder.gep(xsd, [xo]))
            builder.store(fma(builder, blk.mvec, xsv, builder.load(macc)), macc)
    if not ng:
        return None
    m = builder.load(macc)
    m = _hsum(e, m) if ng > 1 else m
    return m if msign[0] > 0 else builder.fsub(ir.Constant(F32, 0.0), m, flags=FAST)


def make_dot(dec, bs, ts, ng, name, perm=None):
    """Matvec row intrinsic (flat, o, nb blocks, tab, x, xs) -> float32 for decoder `dec`
    (bs elements / ts bytes per block, ng offset groups per block, 0 = none). With
    perm = (perm decoder, factor, ng per super-block), whole super-blocks of `factor` blocks use
    the dword-lane decoder (x must be permuted to match), the remaining blocks `dec`.
    Two 16-lane accumulators alternate over groups so FMA latency is hidden."""
    def typer(typingctx, flat, o, nb, tab, x, xs):
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xa, xsa = args
            fty, _, _, tty, _, _ = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            zero16 = ir.Constant(V(F32, 16), [0.0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero16) for _ in range(2)]
            first = ir.Constant(I64, 0)
            ms = []
            if perm is not None:
                pdec, factor, png = perm
                nsb = builder.udiv(nb_, ir.Constant(I64, factor))
                ms.append(_emit_blocks(context, builder, e, sig, args, accs, nsb, first, pdec, bs, ts, png, factor))
                first = builder.mul(nsb, ir.Constant(I64, factor))
            if perm is None or perm[1] > 1:  # remainder blocks of a row (none for K-quants)
                ms.append(_emit_blocks(context, builder, e, sig, args, accs, builder.sub(nb_, first), first,
                                       dec, bs, ts, ng, 1))
            r = _hsum(e, builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=FAST))
            for m in ms:
                if m is not None:
                    r = builder.fadd(r, m, flags=FAST)
            return r
        return types.float32(flat, types.int64, types.int64, tab, x, xs), cg
    typer.__name__ = "dot_" + name
    return typer


def make_deq(dec, bs, ts, name):
    """Row dequant intrinsic: nb blocks at flat[o:] -> dst[d0 : d0 + nb*bs], bit-exact with
    gguf-py (plain fmul then fadd/fsub, no fast-math flags so nothing is contracted)."""
    def typer(typingctx, flat, o, nb, tab, dst, d0):
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, da, d0_ = args
            fty, _, _, tty, dty, _ = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            dd = context.make_array(dty)(context, builder, da).data
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, ts)))
                base = builder.add(d0_, builder.mul(b, ir.Constant(I64, bs)))
                blk = dec(e, ob)
                for eoff, q, s, m in blk.groups:
                    n = q.type.count
                    w = q if s is None else builder.fmul(e.splat(s, n), q)
                    if m is not None:
                        w = builder.fadd(w, e.splat(m, n)) if blk.msign > 0 else builder.fsub(w, e.splat(m, n))
                    p = builder.bitcast(builder.gep(dd, [e.at(base, eoff)]), ir.PointerType(V(F32, n)))
                    builder.store(w, p).align = 4
            return ir.Constant(I64, 0)
        return types.int64(flat, types.int64, types.int64, tab, dst, types.int64), cg
    typer.__name__ = "deq_" + name
    return typer


def make_dot_multi(dec, bs, ts, tb, name):
    """Row intrinsic (flat, o, nb, tab, X, t0) -> UniTuple(float32, tb): the row dotted with
    X[t0 : t0 + tb] (X float32 (T, ncols) C-order). Each block is decoded once to w = s*q +/- m
    in registers and used for all tb vectors (small-batch decode without a scratch row)."""
    def typer(typingctx, flat, o, nb, tab, X, t0):
        rty = types.UniTuple(types.float32, tb)

        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xa, t0_ = args
            fty, _, _, tty, xty, _ = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            xarr = context.make_array(xty)(context, builder, xa)
            ncols = builder.extract_value(xarr.shape, 1)
            rows = [builder.gep(xarr.data, [builder.mul(builder.add(t0_, ir.Constant(I64, t)), ncols)])
                    for t in range(tb)]
            zero16 = ir.Constant(V(F32, 16), [0.0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero16) for _ in range(tb)]
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, ts)))
                xb = builder.mul(b, ir.Constant(I64, bs))
                blk = dec(e, ob)
                for eoff, q, s, m in blk.groups:
                    n = q.type.count
                    w = q if s is None else builder.fmul(e.splat(s, n), q, flags=FAST)
                    if m is not None:
                        w = (builder.fadd if blk.msign > 0 else builder.fsub)(w, e.splat(m, n), flags=FAST)
                    for t in range(tb):
                        xp = builder.bitcast(builder.gep(rows[t], [e.at(xb, eoff)]), ir.PointerType(V(F32, n)))
                        xv = builder.load(xp)
                        xv.align = 4
                        if n == 16:
                            builder.store(fma(builder, w, xv, builder.load(accs[t])), accs[t])
                            continue
                        p = builder.fmul(w, xv, flags=FAST)
                        k = n
                        while k > 16:
                            k //= 2
                            p = builder.fadd(e.shuf(p, range(k)), e.shuf(p, range(k, 2 * k)), flags=FAST)
                        builder.store(builder.fadd(builder.load(accs[t]), p, flags=FAST), accs[t])
            return context.make_tuple(builder, rty, [_hsum(e, builder.load(a)) for a in accs])
        return rty(flat, types.int64, types.int64, tab, X, types.int64), cg
    typer.__name__ = "dotm%d_%s" % (tb, name)
    return typer


# type id -> (decoder, elements per block, bytes per block, offset groups per block, group size)



# types whose matvec uses the dword-lane decoders (measured faster; the 5-bit types are not)
USE_PERM = {2, 3, 6, 7, 12, 13, 14, 10, 11}


def _perm_arg(k):
    if k not in PERM_DECODERS or k not in USE_PERM:
        return None
    pdec, factor, _, png, _ = PERM_DECODERS[k]
    return pdec, factor, png


DOT = {k: make_dot(d, bs, ts, ng, _NAMES[k], _perm_arg(k)) for k, (d, bs, ts, ng, _) in DECODERS.items()}
DEQ = {k: make_deq(d, bs, ts, _NAMES[k]) for k, (d, bs, ts, _, _) in DECODERS.items()}



def _by_kind(table, name, nargs: int = 6):
    """Intrinsic f(kind, *nargs arguments) whose first argument must be a compile-time literal
    type id: the typer picks table[kind] (so a driver specialised with numba.literally(kind)
    contains only that type's code, inlined, without a branch chain).  Numba intrinsics need an
    explicit parameter list, hence one typer per arity (6 here, 7 and 11 for rows_i8)."""
    def resolve(typingctx, kind, args):
        if not isinstance(kind, types.IntegerLiteral) or kind.literal_value not in table:
            return None
        isig, icg = table[kind.literal_value](typingctx, *args)

        def cg(context, builder, sig, a):
            return icg(context, builder, isig, a[1:])
        return isig.return_type(kind, *isig.args), cg

    if nargs == 6:
        def typer(typingctx, kind, flat, o, nb, tab, v, w):
            return resolve(typingctx, kind, (flat, o, nb, tab, v, w))
    elif nargs == 7:
        def typer(typingctx, kind, flat, o, nb, tab, xq, xd, xs):
            return resolve(typingctx, kind, (flat, o, nb, tab, xq, xd, xs))
    elif nargs == 11:
        def typer(typingctx, kind, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn):
            return resolve(typingctx, kind, (flat, o, nb, tab, xq, xd, xs, out, r, t0, tn))
    else:
        raise ValueError(f"no typer for {nargs} arguments")
    typer.__name__ = name
    return intrinsic(typer)


dotm2_any = _by_kind({k: make_dot_multi(d, bs, ts, 2, _NAMES[k]) for k, (d, bs, ts, _, _) in DECODERS.items()},
                     "dotm2_any")  # (kind, flat, o, nb, tab, X, t0) -> 2 x float32
dotm3_any = _by_kind({k: make_dot_multi(d, bs, ts, 3, _NAMES[k]) for k, (d, bs, ts, _, _) in DECODERS.items()},
                     "dotm3_any")
dot_any = _by_kind(DOT, "dot_any")  # (kind, flat, o, nb, tab, x, xs) -> float32
deq_any = _by_kind(DEQ, "deq_any")  # (kind, flat, o, nb, tab, dst, d0) -> int64
