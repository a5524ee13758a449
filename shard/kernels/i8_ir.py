"""LLVM IR pieces shared by the 8-bit activation row kernels (rows_i8.py, rows_i8_32.py,
rows_iq8.py, rows_iq1.py): loads, the integer dot-product intrinsics, the float accumulation in a
fixed order (STRICT flags, explicit fma, a fixed horizontal-sum tree) that keeps a token's
product independent of the tokens beside it, and the multi-token kernels' per-token
accumulators on the stack.
"""
from llvmlite import ir
from numba.core import cgutils

from .rows import F32, I32, V, _hsum
from .x86_int8 import _VPDPBUSD, intrinsic


def _load(builder, context, arrty, arr, off, ty):
    a = context.make_array(arrty)(context, builder, arr)
    v = builder.load(builder.bitcast(builder.gep(a.data, [off]), ir.PointerType(ty)))
    v.align = 1
    return v


def _vnni(builder):
    return _fn(builder, _VPDPBUSD, V(I32, 16), [V(I32, 16)] * 3)


def _fn(builder, name, ret, args):
    return intrinsic(builder, name, ret, args)


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
    """rows._hsum with STRICT flags (no reassociation: the same tree in every kernel)."""
    return _hsum(e, v, STRICT)


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
