"""Block decoders for the row kernels, as LLVM vector IR: one per GGML type (rows.py explains the
scheme). Split from rows.py so the dword-lane decoders of rows_perm.py and the row drivers of
rows.py both build on them without importing each other.

  dec_<T>(e, ob) -> Blk: the block at byte offset ob as groups (element offset, q, scale, offset)
  DECODERS: ggml type id -> (decoder, block elements, block bytes, offset groups, group size)
"""
import os

from llvmlite import ir
from numba.core import cgutils

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
# No "reassoc": LLVM must not reorder a row's sum differently where the same row kernel is inlined
# into different drivers (matvec, gathered, batch-invariant products must agree bit for bit).
FAST = ("nnan", "ninf", "nsz", "arcp", "afn")


def fma(builder, a, b, c):
    """a * b + c with one rounding (llvm.fma, scalar or vector float32).  FAST has no "contract":
    whether LLVM fuses a fmul into the next fadd depends on the code around an inlined kernel, so
    the same row would round differently in matvec and in a multi-token driver; the kernels say
    where they want an FMA instead (batch invariance)."""
    ty = a.type
    name = f"llvm.fma.v{ty.count}f32" if isinstance(ty, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
    return builder.call(fn, [a, b, c])


def V(t, n):
    return ir.VectorType(t, n)


# Software prefetch distance of the row kernels, in bytes ahead of the block being decoded.
# Why: a matvec row kernel keeps few loads in flight, and the hardware prefetchers do not cross
# 4 KiB pages, so a cold product ran at a fraction of the read bandwidth.  Measured here (2
# threads, matrices not in cache, bench/kernels_bench.py-style): Q4_K 2816 x 2048 8.1 -> 17-18
# GB/s with 2-4 KiB ahead (1 KiB: 14), Q8_0 and Q6_K similar; hot (cached) speed unchanged.
PREFETCH_BYTES = int(os.environ.get("DSD_PREFETCH_BYTES", "2048"))


class Emit:
    """Small helper over an IRBuilder: loads from the raw byte array, vector constants."""

    def __init__(self, context, builder, flat_ty, flat, tab_ty, tab):
        self.b = builder
        self.fd = context.make_array(flat_ty)(context, builder, flat).data
        self.td = context.make_array(tab_ty)(context, builder, tab).data
        self.f16c = "+f16c" in context.codegen()._tm_features

    def at(self, off, k):
        return self.b.add(off, ir.Constant(I64, k)) if k else off

    def ld(self, off, n, elem=I8):
        ty = V(elem, n) if n > 1 else elem
        v = self.b.load(self.b.bitcast(self.b.gep(self.fd, [off]), ir.PointerType(ty)))
        v.align = 1
        return v

    def prefetch(self, off):
        """Software prefetch of flat[off] into L1 (llvm.prefetch: read, high locality); never faults."""
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(I8), I32, I32, I32]), "llvm.prefetch.p0")
        self.b.call(fn, [self.b.gep(self.fd, [off]), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

    def f16(self, off):
        """Scalar fp16 at flat[off] via the 65,536-entry table (exact, any CPU)."""
        return self.b.load(self.b.gep(self.td, [self.b.zext(self.ld(off, 1, I16), I64)]))

    def cv(self, elem, vals):
        return ir.Constant(V(elem, len(vals)), list(vals))

    def k8(self, v, n):
        return self.cv(I8, [v] * n)

    def splat(self, v, n):
        vec = self.b.insert_element(ir.Constant(V(v.type, n), None), v, ir.Constant(I32, 0))
        return self.b.shuffle_vector(vec, vec, ir.Constant(V(I32, n), [0] * n))

    def shuf(self, a, idx, c=None):
        return self.b.shuffle_vector(a, a if c is None else c, ir.Constant(V(I32, len(idx)), list(idx)))

    def lo4(self, q):
        return self.b.and_(q, self.k8(15, q.type.count))

    def hi4(self, q):
        return self.b.lshr(q, self.k8(4, q.type.count))

    def bits(self, q, sh, mask):
        n = q.type.count
        if sh:
            q = self.b.lshr(q, self.k8(sh, n))
        return self.b.and_(q, self.k8(mask, n))

    def uf(self, q):
        return self.b.uitofp(q, V(F32, q.type.count))

    def sf(self, q):
        return self.b.sitofp(q, V(F32, q.type.count))

    def cat(self, a, c):
        n = a.type.count
        return self.shuf(a, range(2 * n), c)

    def half_to_f32(self, h):
        """<n x i16> fp16 bit patterns -> <n x float>, exact (incl. subnormals, inf, nan)."""
        n = h.type.count
        b = self.b
        if self.f16c:
            return b.fpext(b.bitcast(h, V(ir.HalfType(), n)), V(F32, n))
        w = b.zext(h, V(I32, n))
        em = b.and_(w, self.cv(I32, [0x7FFF] * n))
        f = b.fmul(b.bitcast(b.shl(em, self.cv(I32, [13] * n)), V(F32, n)),
                   ir.Constant(V(F32, n), [2.0 ** 112] * n))   # rescale exponent bias 15 -> 127
        infnan = b.or_(b.shl(em, self.cv(I32, [13] * n)), self.cv(I32, [0x7F800000] * n))
        isinf = b.icmp_unsigned(">=", em, self.cv(I32, [0x7C00] * n))
        r = b.select(isinf, infnan, b.bitcast(f, V(I32, n)))
        sign = b.shl(b.and_(w, self.cv(I32, [0x8000] * n)), self.cv(I32, [16] * n))
        return b.bitcast(b.or_(r, sign), V(F32, n))


class Blk:
    """Decoded block: groups [(eoff, q, s, m)], w = s*q (+ or - per msign) m; s None = 1,
    m None = no offset. mvec: the groups' m values as a vector (or scalar) for matvec."""

    def __init__(self, groups, mvec=None, msign=1.0):
        self.groups, self.mvec, self.msign = groups, mvec, msign


# ---------------------------------------------------------------- decoders (e, ob) -> Blk
# ob = byte offset of the block in flat. Layouts are those of ggml (comments give bytes).

def dec_q4_0(e, ob):  # 18 B: d | qs[16]; elems 0..15 low nibbles, 16..31 high; w = d*(q-8)
    q = e.ld(e.at(ob, 2), 16)
    q = e.b.sub(e.cat(e.lo4(q), e.hi4(q)), e.k8(8, 32))
    return Blk([(0, e.sf(q), e.f16(ob), None)])


def dec_q4_1(e, ob):  # 20 B: d | m | qs[16]; w = d*q + m
    q = e.ld(e.at(ob, 4), 16)
    m = e.f16(e.at(ob, 2))
    return Blk([(0, e.uf(e.cat(e.lo4(q), e.hi4(q))), e.f16(ob), m)], m, 1.0)


def _q5_high(e, off):
    """4 bytes (uint32 qh) at flat[off] -> <32 x i8> with 16 where bit j is set, else 0."""
    qh = e.shuf(e.ld(off, 4), [j // 8 for j in range(32)])
    hit = e.b.icmp_unsigned("!=", e.b.and_(qh, e.cv(I8, [1 << (j % 8) for j in range(32)])), e.k8(0, 32))
    return e.b.select(hit, e.k8(16, 32), e.k8(0, 32))


def dec_q5_0(e, ob):  # 22 B: d | qh u32 | qs[16]; w = d*((nib | bit<<4) - 16)
    q = e.ld(e.at(ob, 6), 16)
    q = e.b.or_(e.cat(e.lo4(q), e.hi4(q)), _q5_high(e, e.at(ob, 2)))
    return Blk([(0, e.sf(e.b.sub(q, e.k8(16, 32))), e.f16(ob), None)])


def dec_q5_1(e, ob):  # 24 B: d | m | qh u32 | qs[16]; w = d*(nib | bit<<4) + m
    q = e.ld(e.at(ob, 8), 16)
    q = e.b.or_(e.cat(e.lo4(q), e.hi4(q)), _q5_high(e, e.at(ob, 4)))
    m = e.f16(e.at(ob, 2))
    return Blk([(0, e.uf(q), e.f16(ob), m)], m, 1.0)


def dec_q8_0(e, ob):  # 34 B: d | int8[32]; w = q*d
    return Blk([(0, e.sf(e.ld(e.at(ob, 2), 32)), e.f16(ob), None)])


def _k_scales(e, ob):
    """Q4_K/Q5_K: 8 (scale, min) 6-bit pairs in 12 bytes at ob+4 -> (d*sc, dmin*mn) <8 x float>."""
    sc, mn = k_scales_int(e, ob)
    d, dmin = e.f16(ob), e.f16(e.at(ob, 2))
    return e.b.fmul(e.splat(d, 8), e.uf(sc)), e.b.fmul(e.splat(dmin, 8), e.uf(mn))


def k_scales_int(e, ob):
    """Q4_K/Q5_K: the 8 6-bit (scale, min) pairs in 12 bytes at ob+4 -> (sc, mn) <8 x i8>."""
    sb = e.ld(e.at(ob, 4), 16)  # 12 scale bytes + 4 bytes of what follows (in the block)
    hi_mask = e.cv(I8, [0] * 4 + [0x30] * 4)
    low_mask = e.cv(I8, [63] * 4 + [15] * 4)
    top = e.b.shl(e.b.lshr(e.shuf(sb, [0, 1, 2, 3, 0, 1, 2, 3]), e.k8(6, 8)), e.k8(4, 8))
    sc = e.b.or_(e.b.and_(e.shuf(sb, [0, 1, 2, 3, 8, 9, 10, 11]), low_mask), e.b.and_(top, hi_mask))
    top = e.b.shl(e.b.lshr(e.shuf(sb, [4, 5, 6, 7, 4, 5, 6, 7]), e.k8(6, 8)), e.k8(4, 8))
    mn = e.b.lshr(e.shuf(sb, [4, 5, 6, 7, 8, 9, 10, 11]), e.cv(I8, [0] * 4 + [4] * 4))
    mn = e.b.or_(e.b.and_(mn, low_mask), e.b.and_(top, hi_mask))
    return sc, mn


def _ext(e, v, i):
    return e.b.extract_element(v, ir.Constant(I32, i))


def dec_q4_k(e, ob):  # 144 B: d | dmin | scales[12] | qs[128]; w = (d*sc)*q - dmin*mn
    sv, mv = _k_scales(e, ob)
    groups = []
    for c in range(4):  # sub-blocks 2c (low nibbles) and 2c+1 (high) share 32 bytes
        q = e.ld(e.at(ob, 16 + 32 * c), 32)
        groups.append((64 * c, e.uf(e.lo4(q)), _ext(e, sv, 2 * c), _ext(e, mv, 2 * c)))
        groups.append((64 * c + 32, e.uf(e.hi4(q)), _ext(e, sv, 2 * c + 1), _ext(e, mv, 2 * c + 1)))
    return Blk(groups, mv, -1.0)


def dec_q5_k(e, ob):  # 176 B: d | dmin | scales[12] | qh[32] | qs[128]; bit s of qh = sub-block s
    sv, mv = _k_scales(e, ob)
    qh = e.ld(e.at(ob, 16), 32)
    groups = []
    for c in range(4):
        q = e.ld(e.at(ob, 48 + 32 * c), 32)
        for s, nib in ((2 * c, e.lo4(q)), (2 * c + 1, e.hi4(q))):
            v = e.b.or_(nib, e.b.shl(e.bits(qh, s, 1), e.k8(4, 32)))
            groups.append((32 * s, e.uf(v), _ext(e, sv, s), _ext(e, mv, s)))
    return Blk(groups, mv, -1.0)


def dec_q6_k(e, ob):  # 210 B: ql[128] | qh[64] | scales int8[16] | d; w = (d*sc)*(q-32)
    sv = e.b.fmul(e.splat(e.f16(e.at(ob, 208)), 16), e.sf(e.ld(e.at(ob, 192), 16)))
    groups = []
    for h in range(2):  # halves of 128 elements
        ql0, ql1 = e.ld(e.at(ob, 64 * h), 32), e.ld(e.at(ob, 64 * h + 32), 32)
        qh = e.ld(e.at(ob, 128 + 32 * h), 32)
        for k, lo in enumerate((e.lo4(ql0), e.lo4(ql1), e.hi4(ql0), e.hi4(ql1))):
            v = e.b.or_(lo, e.b.shl(e.bits(qh, 2 * k, 3), e.k8(4, 32)))
            v = e.sf(e.b.sub(v, e.k8(32, 32)))
            for half in range(2):  # 16-element scale groups
                g = 8 * h + 2 * k + half
                groups.append((16 * g, e.shuf(v, range(16 * half, 16 * half + 16)), _ext(e, sv, g), None))
    return Blk(groups)


def q3k_scales(e, ob):
    """Q3_K: 16 6-bit scales (+32 offset) in 12 bytes at ob+96 -> d * (sc - 32) <16 x float>."""
    lo = e.shuf(e.ld(e.at(ob, 96), 8), list(range(8)) * 2)
    lo = e.b.and_(e.b.lshr(lo, e.cv(I8, [0] * 8 + [4] * 8)), e.k8(15, 16))
    hi = e.shuf(e.ld(e.at(ob, 104), 4), [0, 1, 2, 3] * 4)
    hi = e.b.and_(e.b.lshr(hi, e.cv(I8, [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4)), e.k8(3, 16))
    sc = e.b.sub(e.b.or_(lo, e.b.shl(hi, e.k8(4, 16))), e.k8(32, 16))
    return e.b.fmul(e.splat(e.f16(e.at(ob, 108)), 16), e.sf(sc))


def dec_q3_k(e, ob):  # 110 B: hmask[32] | qs[64] | scales[12] | d; w = (d*(sc-32))*(ql - 4*!hbit)
    sv = q3k_scales(e, ob)
    hm = e.ld(ob, 32)
    groups = []
    for j in range(8):  # 32-element chunks: qs half j//4, bit pair j%4, hmask bit j
        ql = e.bits(e.ld(e.at(ob, 32 + 32 * (j // 4)), 32), 2 * (j % 4), 3)
        nb = e.b.shl(e.b.xor(e.bits(hm, j, 1), e.k8(1, 32)), e.k8(2, 32))
        v = e.sf(e.b.sub(ql, nb))
        for half in range(2):
            g = 2 * j + half
            groups.append((16 * g, e.shuf(v, range(16 * half, 16 * half + 16)), _ext(e, sv, g), None))
    return Blk(groups)


def dec_q2_k(e, ob):  # 84 B: scales[16] (lo: scale, hi: min) | qs[64] | d | dmin; w = dl*q - ml
    sb = e.ld(ob, 16)
    dl = e.b.fmul(e.splat(e.f16(e.at(ob, 80)), 16), e.uf(e.lo4(sb)))
    ml = e.b.fmul(e.splat(e.f16(e.at(ob, 82)), 16), e.uf(e.hi4(sb)))
    groups = []
    for j in range(8):
        v = e.uf(e.bits(e.ld(e.at(ob, 16 + 32 * (j // 4)), 32), 2 * (j % 4), 3))
        for half in range(2):
            g = 2 * j + half
            groups.append((16 * g, e.shuf(v, range(16 * half, 16 * half + 16)), _ext(e, dl, g), _ext(e, ml, g)))
    return Blk(groups, ml, -1.0)


def dec_f16(e, ob):  # 32 fp16 values (64 B) as one "block"
    return Blk([(0, e.half_to_f32(e.ld(ob, 32, I16)), None, None)])


def dec_bf16(e, ob):  # 32 bf16 values: the upper halves of float32
    w = e.b.shl(e.b.zext(e.ld(ob, 32, I16), V(I32, 32)), e.cv(I32, [16] * 32))
    return Blk([(0, e.b.bitcast(w, V(F32, 32)), None, None)])


def dec_f32(e, ob):  # 32 float32 values (128 B)
    return Blk([(0, e.ld(ob, 32, F32), None, None)])


DECODERS = {
    2: (dec_q4_0, 32, 18, 0, 32), 3: (dec_q4_1, 32, 20, 1, 32), 6: (dec_q5_0, 32, 22, 0, 32),
    7: (dec_q5_1, 32, 24, 1, 32), 8: (dec_q8_0, 32, 34, 0, 32), 10: (dec_q2_k, 256, 84, 16, 16),
    11: (dec_q3_k, 256, 110, 0, 16), 12: (dec_q4_k, 256, 144, 8, 32), 13: (dec_q5_k, 256, 176, 8, 32),
    14: (dec_q6_k, 256, 210, 0, 16), 1: (dec_f16, 32, 64, 0, 32), 30: (dec_bf16, 32, 64, 0, 32),
    0: (dec_f32, 32, 128, 0, 32),
}
_NAMES = {2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_k", 11: "q3_k", 12: "q4_k",
          13: "q5_k", 14: "q6_k", 1: "f16", 30: "bf16", 0: "f32"}
