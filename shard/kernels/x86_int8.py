"""The AVX-512 integer dot-product instructions the 8-bit row kernels call (rows_i8.py), and
their AVX2 forms for CPUs without VNNI (the AMD variant of the machine).

`intrinsic(builder, name, ret, args)` returns what to `builder.call`: the LLVM intrinsic itself
where numba compiles for AVX-512 BW + VNNI, else an internal always-inline function with the
same signature built from AVX2 instructions with the same int32 results (see _AVX2_FORMS).
"""
from llvmlite import ir
from numba.core import cgutils

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def V(t, n):
    return ir.VectorType(t, n)


_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"  # (acc <16 x i32>, u8 x64 as <16 x i32>, s8 x64 as <16 x i32>)
_PMADDUBSW = "llvm.x86.avx512.pmaddubs.w.512"  # (u8 x64, s8 x64) -> adjacent pairs summed, <32 x i16>
_VPDPWSSD = "llvm.x86.avx512.vpdpwssd.512"  # (acc <16 x i32>, i16 x32, i16 x32 as <16 x i32>)


def _features() -> str:
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen()._tm_features


def has_vnni() -> bool:
    """numba compiles for AVX-512 BW + VNNI: the three instructions above exist."""
    f = _features()
    return "+avx512vnni" in f and "+avx512bw" in f


def has_avx2_int8() -> bool:
    """AVX2 without VNNI (the AMD variant of the machine): the kernels run on vpmaddubsw +
    vpmaddwd pairs instead (_avx2_function), with the same int32 results."""
    return "+avx2" in _features()


def intrinsic(builder, name, ret, args):
    """The function to call for intrinsic `name` of type ret(args) in builder's module."""
    if name in _AVX2_FORMS and not has_vnni():
        return _avx2_function(builder.module, name)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


# -- the AVX-512 integer instructions from AVX2 pieces ------------------------------------------
# Each is an internal always-inline function with the AVX-512 intrinsic's signature, so the
# kernels call it the same way.  The 512-bit operands are split into two 256-bit halves:
#   pmaddubs.w.512(u, s)        = [avx2.pmadd.ub.sw(u_lo, s_lo) ; ... hi]   (identical: same
#                                 saturating int16 pair sums, per 256-bit lane)
#   vpdpwssd.512(acc, a, b)     = acc + [avx2.pmadd.wd(a_lo, b_lo) ; ... hi]  (identical: the two
#                                 int16 products of a pair summed exactly into int32)
#   vpdpbusd.512(acc, u, s)     = acc + pmadd.wd(pmadd.ub.sw(u, s), 1)      (identical while every
#                                 pair sum u0 s0 + u1 s1 fits in int16; VNNI does not saturate.
#                                 True for every caller here: 4-bit u (Q4_1: <= 2 * 15 * 128) and
#                                 the constant 128 (Q8_0's correction: -32768 .. 32512); NOT for
#                                 Q8_0's u = x + 128, so Q8_0 uses the sign trick on AVX2 instead,
#                                 rows_i8_32._q8_0_row)
_AVX2_FORMS = {_PMADDUBSW: "dsd.avx2.pmaddubsw512", _VPDPWSSD: "dsd.avx2.vpdpwssd512",
               _VPDPBUSD: "dsd.avx2.vpdpbusd512"}


def _halves(b, v, n):
    """<2n x T> -> its two <n x T> halves."""
    return [b.shuffle_vector(v, v, ir.Constant(V(I32, n), list(range(h * n, h * n + n)))) for h in (0, 1)]


def _join(b, lo, hi, n):
    return b.shuffle_vector(lo, hi, ir.Constant(V(I32, 2 * n), list(range(2 * n))))


def _avx2_function(module, name):
    fname = _AVX2_FORMS[name]
    try:
        return module.get_global(fname)
    except KeyError:
        pass
    madd_ub = cgutils.get_or_insert_function(
        module, ir.FunctionType(V(I16, 16), [V(I8, 32), V(I8, 32)]), "llvm.x86.avx2.pmadd.ub.sw")
    madd_wd = cgutils.get_or_insert_function(
        module, ir.FunctionType(V(I32, 8), [V(I16, 16), V(I16, 16)]), "llvm.x86.avx2.pmadd.wd")
    if name == _PMADDUBSW:
        fnty = ir.FunctionType(V(I16, 32), [V(I8, 64), V(I8, 64)])
    else:
        fnty = ir.FunctionType(V(I32, 16), [V(I32, 16)] * 3)
    fn = ir.Function(module, fnty, fname)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block())

    def maddubs(u, s):  # <64 x i8> u8, <64 x i8> s8 -> <32 x i16>
        (ul, uh), (sl, sh) = _halves(b, u, 32), _halves(b, s, 32)
        return _join(b, b.call(madd_ub, [ul, sl]), b.call(madd_ub, [uh, sh]), 16)

    def maddwd(x, y):  # <32 x i16> x2 -> <16 x i32>
        (xl, xh), (yl, yh) = _halves(b, x, 16), _halves(b, y, 16)
        return _join(b, b.call(madd_wd, [xl, yl]), b.call(madd_wd, [xh, yh]), 8)

    if name == _PMADDUBSW:
        b.ret(maddubs(*fn.args))
    elif name == _VPDPWSSD:
        acc, x, y = fn.args
        b.ret(b.add(acc, maddwd(b.bitcast(x, V(I16, 32)), b.bitcast(y, V(I16, 32)))))
    else:
        acc, u, s = fn.args
        pairs = maddubs(b.bitcast(u, V(I8, 64)), b.bitcast(s, V(I8, 64)))
        b.ret(b.add(acc, maddwd(pairs, ir.Constant(V(I16, 32), [1] * 32))))
    return fn
