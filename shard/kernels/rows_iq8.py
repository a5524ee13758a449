"""IQ4_NL, IQ4_XS, MXFP4, IQ2_XXS, IQ3_XXS, IQ2_XS, IQ2_S, IQ3_S and TQ2_0 rows with 8-bit activations
and integer dot products (issue 15), the way llama.cpp computes them on AVX2:

    IQ4_NL (18 B: d | qs[16])   and MXFP4 (17 B: E8M0 e | qs[16]) against x quantized per 32
        elements (xq int8, xd float32 per 32; drivers_i8.quant_x_q8_32, llama.cpp's Q8_0):
        sum w x = sum_b s_b dx_b (sum_i v_i xq_i),  s_b = d (fp16) or 2^(e - 128), v = kvalue
    IQ4_XS (136 B: d | scales_h u16 | scales_l[4] | qs[128]) against x quantized per 256
        (drivers_i8.quant_x_q8k, llama.cpp's Q8_K):
        sum w x = sum_B d_B dx_B sum_j (ls_j - 32) (sum_{i in sub-block j} v_i xq_i)
    IQ2_XXS / IQ3_XXS / IQ2_XS / IQ2_S / IQ3_S against x per 256: grid rows (int8, unsigned)
        and sign masks from constant tables (_dec_grid, _dec_iq2_xs_s, _dec_iq3_s), the 4-bit
        scales as 2 ls + 1
    TQ2_0 against x per 256: the 2-bit codes minus 1 as int8, the IQ4 codes' products

The 4-bit codes become their int8 table values (KV_IQ4: -127 .. 113; KV_FP4 doubled E2M1:
-12 .. 12) by one vpshufb (the 16-entry table in both 128-bit lanes), then the signed x signed
products go through vpmaddubsw with llama.cpp's sign trick: |v| (unsigned) times x * sign(v)
-- pair sums <= 2 * 127 * 127 < 2^15, exact -- and vpmaddwd (by 1, or by the sub-block scale)
into int32 lanes: the integer sum of a block is exact.  Float work per block and token: one
int -> float conversion and one fma by s_b * dx_b into an 8-lane accumulator, summed in a fixed
tree at the end (i8_ir._hsum_strict).  The multi-token kernels decode each block once for up
to 16 tokens and run the one-token kernel's arithmetic per token (_block_token), so products
are batch-invariant.

AVX2 instructions (llvm.x86.avx2.*): used only where registry.INT8_ACTIVATIONS holds (AVX2 or
AVX-512 VNNI).  With AVX-512 VNNI the unscaled 32-element sums (IQ4_NL, MXFP4, TQ1_0,
TQ2_0) are one 256-bit vpdpbusd each (_Ops.dot32; the same integers, so AVX2 and VNNI machines
give bit-identical products): IQ4_NL / TQ2_0 matvec 6% / 12% faster on the Zen 4 machine
(2048 rows x 4096 columns, one thread), TQ1_0 unchanged (its digit decode dominates).
IQ1_S, IQ1_M and TQ1_0: their decoders in rows_iq1.py (IQ1_SPECS), merged into _SPECS here,
so they share these row kernels and drivers.
Cache note: numba keys the on-disk cache of these drivers on this file's text only, so
numba's cache of this package is dropped whenever any of its files changes (kernels/__init__.py).
"""
import numpy as np
from gguf import GGMLQuantizationType as G
from llvmlite import ir
from numba import literally, njit, prange
from numba.core import cgutils, types
from numba.extending import overload

from .dequant_iq import GRID_IQ2S, GRID_IQ2XS, GRID_IQ2XXS, GRID_IQ3S, GRID_IQ3XXS, KSIGNS, KV_FP4, KV_IQ4
from .drivers_i8 import quant_x_q8_32, quant_x_q8k
from .rows_iq1 import IQ1_KINDS, IQ1_SPECS
from .rows import F32, I8, I16, I32, I64, PREFETCH_BYTES, V, Emit, _by_kind
from .x86_int8 import _features, has_vnni
from .i8_ir import STRICT, _fma, _hsum_strict, _rows_2d, _store_token_sums, _token_accs

K_IQ4_NL, K_IQ4_XS, K_MXFP4 = int(G.IQ4_NL), int(G.IQ4_XS), int(G.MXFP4)
K_IQ2_XXS, K_IQ3_XXS = int(G.IQ2_XXS), int(G.IQ3_XXS)
K_IQ2_XS, K_IQ2_S, K_TQ2_0, K_IQ3_S = int(G.IQ2_XS), int(G.IQ2_S), int(G.TQ2_0), int(G.IQ3_S)
IQ8_KINDS = (K_IQ4_NL, K_IQ4_XS, K_MXFP4, K_IQ2_XXS, K_IQ3_XXS, K_IQ2_XS, K_IQ2_S, K_TQ2_0, K_IQ3_S) + IQ1_KINDS
_Q8K_KINDS = (K_IQ4_XS, K_IQ2_XXS, K_IQ3_XXS, K_IQ2_XS, K_IQ2_S, K_TQ2_0, K_IQ3_S) + IQ1_KINDS  # x per 256
# lookup tables as LLVM constants: the grid rows as little-endian words (byte j = element j),
# and per 7-bit sign index the 8 bytes 0xFF (element negated) / 0x00 of KSIGNS' bits
_GRID2 = np.ascontiguousarray(GRID_IQ2XXS).view("<u8").ravel().astype(np.uint64)
_GRID3 = np.ascontiguousarray(GRID_IQ3XXS).view("<u4").ravel().astype(np.uint64)
_GRID2X = np.ascontiguousarray(GRID_IQ2XS).view("<u8").ravel().astype(np.uint64)
_GRID2S = np.ascontiguousarray(GRID_IQ2S).view("<u8").ravel().astype(np.uint64)
_GRID3S = np.ascontiguousarray(GRID_IQ3S).view("<u4").ravel().astype(np.uint64)
_BMASK = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0xFF, 0).astype(np.uint8).view("<u8").ravel()
_SMASK = _BMASK.reshape(256)[KSIGNS].astype(np.uint64)  # by 7-bit sign index
_BMASK = _BMASK.astype(np.uint64)  # by sign byte (IQ2_S)
ROWS_PER_ITEM = 16  # rows per parallel work item (as products_iq)
_VNNI256 = has_vnni() and "+avx512vl" in _features()  # the 256-bit vpdpbusd needs VNNI + VL


def _avx2(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


class _Ops:
    """The AVX2 pieces of a 32-element block product."""

    def __init__(self, builder, table):
        b = self.b = builder
        self.pshufb = _avx2(b, "llvm.x86.avx2.pshuf.b", V(I8, 32), [V(I8, 32), V(I8, 32)])
        self.maddubs = _avx2(b, "llvm.x86.avx2.pmadd.ub.sw", V(I16, 16), [V(I8, 32), V(I8, 32)])
        self.maddwd = _avx2(b, "llvm.x86.avx2.pmadd.wd", V(I32, 8), [V(I16, 16), V(I16, 16)])
        self.tab = ir.Constant(V(I8, 32), [int(v) & 0xFF for v in table] * 2)
        self.zero = ir.Constant(V(I8, 32), [0] * 32)
        self.ones = ir.Constant(V(I16, 16), [1] * 16)

    def values(self, e, off):
        """The 32 int8 table values of the 16 code bytes at flat[off] (low nibbles = elements
        0-15, high nibbles = 16-31)."""
        b = self.b
        q = e.ld(off, 16)
        codes = e.cat(e.lo4(q), e.hi4(q))
        return b.call(self.pshufb, [self.tab, codes])

    def signed(self, v, xv):
        """llama.cpp's sign trick: (|v| as unsigned, x * sign(v)), so that u8 x s8 products work."""
        b = self.b
        neg = b.icmp_signed("<", v, self.zero)
        return b.select(neg, b.sub(self.zero, v), v), b.select(neg, b.sub(self.zero, xv), xv)

    def pairs(self, v, xv):
        """<16 x i16>: v[2k] xv[2k] + v[2k+1] xv[2k+1] exactly (|v|, |xv| <= 127)."""
        return self.b.call(self.maddubs, list(self.signed(v, xv)))

    def dot32(self, v, xv, scale16=None):
        """<8 x i32> lanes of sum v xq over 32 elements (times an int16 scale).  With AVX-512
        VNNI (256-bit forms) the unscaled sum is one vpdpbusd on |v| and sign(v) x (4 products
        per int32 lane, no int16 step: the same exact integers, since the pair sums never
        saturate here); the scaled one stays vpmaddubsw + vpmaddwd (LLVM fuses the add into
        vpdpwssd itself)."""
        b = self.b
        if scale16 is None and _VNNI256:
            av, sx = self.signed(v, xv)
            fn = _avx2(b, "llvm.x86.avx512.vpdpbusd.256", V(I32, 8), [V(I32, 8)] * 3)
            return b.call(fn, [ir.Constant(V(I32, 8), [0] * 8), b.bitcast(av, V(I32, 8)), b.bitcast(sx, V(I32, 8))])
        return b.call(self.maddwd, [self.pairs(v, xv), self.ones if scale16 is None else scale16])


def _xload(builder, context, ty, arr, off, vt):
    a = context.make_array(ty)(context, builder, arr)
    v = builder.load(builder.bitcast(builder.gep(a.data, [off]), ir.PointerType(vt)))
    v.align = 1
    return v


def _e8m0_half(builder, e):
    """uint8 exponent -> float32 2^(e - 128) (dequant_iq.e8m0_half: e < 2 subnormal)."""
    e32 = builder.zext(e, I32)
    small = builder.icmp_unsigned("<", e32, ir.Constant(I32, 2))
    bits = builder.select(small, builder.shl(ir.Constant(I32, 0x00200000), e32),
                          builder.shl(builder.sub(e32, ir.Constant(I32, 1)), ir.Constant(I32, 23)))
    return builder.bitcast(bits, F32)


def _table(builder, name, vals, ty):
    """A constant array global of builder's module (created once per module)."""
    mod = builder.module
    try:
        return mod.get_global(name)
    except KeyError:
        aty = ir.ArrayType(ty, len(vals))
        g = ir.GlobalVariable(mod, aty, name)
        g.initializer = ir.Constant(aty, [int(v) for v in vals])
        g.global_constant = True
        g.linkage = "internal"
        return g


def _words(builder, table, idxs, ty, n):
    """<32 x i8>: the n words table[idxs[k]] (i32 indices) side by side."""
    v = ir.Constant(V(ty, n), None)
    for k, i in enumerate(idxs):
        w = builder.load(builder.gep(table, [ir.Constant(I32, 0), i]))
        v = builder.insert_element(v, w, ir.Constant(I32, k))
    return builder.bitcast(v, V(I8, 32))


# Each type: (block bytes, elements per block = per x scale, decode, token).  decode(e, b, ops,
# ob) -> the weight side of the block at byte ob (decoded once, for every token of a multi-
# token call); token(e, b, ops, w, xv) with xv(k) the 32 int8 x at element k of the block ->
# (<8 x i32> integer sums, the block's float scale s): the block adds sitofp(isum) * (s * dx).

def _dec32(fp4):
    def decode(e, b, ops, ob):
        s = _e8m0_half(b, e.ld(ob, 1)) if fp4 else e.f16(ob)
        return ops.values(e, e.at(ob, 1 if fp4 else 2)), s

    def token(e, b, ops, w, xv):
        return ops.dot32(w[0], xv(0)), w[1]
    return (17 if fp4 else 18), 32, decode, token


def _dec_iq4_xs(e, b, ops, ob):
    # 136 B: d | scales_h u16 (2 bits per 32 elements) | scales_l[4] (nibbles) | qs[128];
    # sub-block ib: scale (l | h << 4) - 32, codes as IQ4_NL's over qs[16 ib : 16 ib + 16]
    sh = b.zext(e.ld(e.at(ob, 2), 1, I16), I32)
    vs, scs = [], []
    for ib in range(8):
        lo = b.and_(b.lshr(b.zext(e.ld(e.at(ob, 4 + ib // 2), 1), I32), ir.Constant(I32, 4 * (ib % 2))),
                    ir.Constant(I32, 15))
        hi = b.and_(b.lshr(sh, ir.Constant(I32, 2 * ib)), ir.Constant(I32, 3))
        ls = b.sub(b.or_(lo, b.shl(hi, ir.Constant(I32, 4))), ir.Constant(I32, 32))
        vs.append(ops.values(e, e.at(ob, 8 + 16 * ib)))
        scs.append(e.splat(b.trunc(ls, I16), 16))
    return vs, scs, e.f16(ob)


def _tok_iq4_xs(e, b, ops, w, xv):
    vs, scs, d = w
    isum = ir.Constant(V(I32, 8), [0] * 8)
    for ib in range(8):
        isum = b.add(isum, ops.dot32(vs[ib], xv(32 * ib), scs[ib]))
    return isum, d


def _dec_grid(iq3):
    """IQ2_XXS (66 B: d | 8 x (4 grid indices u8 | u32 4 x 7-bit sign indices | scale << 28))
    or IQ3_XXS (98 B: d | qs[64] grid indices (a 4-value row each) | 8 x u32 signs + scale):
        w = d (ls + 1/2) / 4 * g * sign (IQ2_XXS), d (ls + 1/2) / 2 * g * sign (IQ3_XXS)
        sum w x = d dx / 8 (or / 4) * sum_j (2 ls_j + 1) (sum_{i in j} g_i (+-xq_i))
    The grid values (unsigned, <= 62) are vpmaddubsw's unsigned operand, the signs go onto x
    ((x ^ m) - m with m = 0 / -1 per byte), the scale into vpmaddwd: exact int32 lanes."""
    i64 = ir.IntType(64)

    def decode(e, b, ops, ob):
        grid = _table(b, "dsd.grid_iq3xxs" if iq3 else "dsd.grid_iq2xxs", _GRID3 if iq3 else _GRID2,
                      I32 if iq3 else i64)
        smask = _table(b, "dsd.ksigns_mask", _SMASK, i64)
        e.prefetch(e.at(ob, PREFETCH_BYTES + 64))
        gs, ms, scs = [], [], []
        for ib in range(8):
            aux = e.ld(e.at(ob, 66 + 4 * ib if iq3 else 6 + 8 * ib), 1, I32)
            nidx = 8 if iq3 else 4
            gi = [b.zext(e.ld(e.at(ob, 2 + 8 * ib + k), 1), I32) for k in range(nidx)]
            gs.append(_words(b, grid, gi, I32 if iq3 else i64, nidx))
            si = [b.and_(b.lshr(aux, ir.Constant(I32, 7 * k)), ir.Constant(I32, 127)) for k in range(4)]
            ms.append(_words(b, smask, si, i64, 4))
            sc = b.add(b.shl(b.lshr(aux, ir.Constant(I32, 28)), ir.Constant(I32, 1)), ir.Constant(I32, 1))
            scs.append(e.splat(b.trunc(sc, I16), 16))
        return gs, ms, scs, b.fmul(e.f16(ob), ir.Constant(F32, 0.25 if iq3 else 0.125), flags=STRICT)

    def token(e, b, ops, w, xv):
        gs, ms, scs, s = w
        isum = ir.Constant(V(I32, 8), [0] * 8)
        for ib in range(8):
            sx = b.sub(b.xor(xv(32 * ib), ms[ib]), ms[ib])
            isum = b.add(isum, b.call(ops.maddwd, [b.call(ops.maddubs, [gs[ib], sx]), scs[ib]]))
        return isum, s
    return (98 if iq3 else 66), 256, decode, token


def _dec_iq2_xs_s(iq2s):
    """IQ2_XS (74 B: d | 32 x u16 (9-bit grid index | 7-bit sign index << 9) | scales[8]) or
    IQ2_S (82 B: d | qs[32] low index bits | signs[32] a byte per 8 | qh[8] 2 high bits per 8 |
    scales[8]); a nibble scale per 16 elements, w = d (ls + 1/2) / 4 * g * sign: _dec_grid's
    token arithmetic with the two scales of a sub-block side by side."""
    i64 = ir.IntType(64)

    def decode(e, b, ops, ob):
        grid = _table(b, "dsd.grid_iq2s" if iq2s else "dsd.grid_iq2xs", _GRID2S if iq2s else _GRID2X, i64)
        smask = _table(b, "dsd.bsigns_mask" if iq2s else "dsd.ksigns_mask", _BMASK if iq2s else _SMASK, i64)
        e.prefetch(e.at(ob, PREFETCH_BYTES + 64))
        gs, ms, scs = [], [], []
        for ib in range(8):
            gi, si = [], []
            for l in range(4):
                g = 4 * ib + l
                if iq2s:
                    hi = b.and_(b.lshr(b.zext(e.ld(e.at(ob, 66 + ib), 1), I32), ir.Constant(I32, 2 * l)),
                                ir.Constant(I32, 3))
                    gi.append(b.or_(b.zext(e.ld(e.at(ob, 2 + g), 1), I32), b.shl(hi, ir.Constant(I32, 8))))
                    si.append(b.zext(e.ld(e.at(ob, 34 + g), 1), I32))
                else:
                    q = b.zext(e.ld(e.at(ob, 2 + 2 * g), 1, I16), I32)
                    gi.append(b.and_(q, ir.Constant(I32, 511)))
                    si.append(b.lshr(q, ir.Constant(I32, 9)))
            gs.append(_words(b, grid, gi, i64, 4))
            ms.append(_words(b, smask, si, i64, 4))
            sb = b.zext(e.ld(e.at(ob, (74 if iq2s else 66) + ib), 1), I16)
            lo = b.add(b.shl(b.and_(sb, ir.Constant(I16, 15)), ir.Constant(I16, 1)), ir.Constant(I16, 1))
            hi = b.add(b.shl(b.lshr(sb, ir.Constant(I16, 4)), ir.Constant(I16, 1)), ir.Constant(I16, 1))
            scs.append(e.cat(e.splat(lo, 8), e.splat(hi, 8)))
        return gs, ms, scs, b.fmul(e.f16(ob), ir.Constant(F32, 0.125), flags=STRICT)
    return (82 if iq2s else 74), 256, decode, _dec_grid(False)[3]


def _dec_iq3_s(e, b, ops, ob):
    # 110 B: d | qs[64] (low 8 index bits per 4 elements) | qh[8] (9th bits) | signs[32] (a byte
    # per 8) | scales[4] (a nibble per 32); w = d (1 + 2 s) g sign: _dec_grid's token arithmetic
    i64 = ir.IntType(64)
    grid = _table(b, "dsd.grid_iq3s", _GRID3S, I32)
    smask = _table(b, "dsd.bsigns_mask", _BMASK, i64)
    e.prefetch(e.at(ob, PREFETCH_BYTES + 64))
    gs, ms, scs = [], [], []
    for ib in range(8):
        h = b.zext(e.ld(e.at(ob, 66 + ib), 1), I32)
        gi = [b.or_(b.zext(e.ld(e.at(ob, 2 + 8 * ib + k), 1), I32),
                    b.shl(b.and_(b.lshr(h, ir.Constant(I32, k)), ir.Constant(I32, 1)), ir.Constant(I32, 8)))
              for k in range(8)]
        gs.append(_words(b, grid, gi, I32, 8))
        ms.append(_words(b, smask, [b.zext(e.ld(e.at(ob, 74 + 4 * ib + l), 1), I32) for l in range(4)], i64, 4))
        sc = b.and_(b.lshr(b.zext(e.ld(e.at(ob, 106 + ib // 2), 1), I32), ir.Constant(I32, 4 * (ib % 2))),
                    ir.Constant(I32, 15))
        scs.append(e.splat(b.trunc(b.add(b.shl(sc, ir.Constant(I32, 1)), ir.Constant(I32, 1)), I16), 16))
    return gs, ms, scs, e.f16(ob)


def _dec_tq2_0(e, b, ops, ob):
    # 66 B: qs[64] (2 bits per element) | d; element 128 h + 32 k + j = bits 2k of qs[32 h + j],
    # minus 1: values -1 / 0 / 1 (int8), through the same sign-trick products as the IQ4 codes
    vs = []
    for h in range(2):
        q = e.ld(e.at(ob, 32 * h), 32)
        for k in range(4):
            vs.append(b.sub(e.bits(q, 2 * k, 3), e.k8(1, 32)))
    return vs, e.f16(e.at(ob, 64))


def _tok_tq2_0(e, b, ops, w, xv):
    vs, d = w
    isum = ir.Constant(V(I32, 8), [0] * 8)
    for c in range(8):
        isum = b.add(isum, ops.dot32(vs[c], xv(32 * c)))
    return isum, d


_SPECS = {K_IQ3_S: (110, 256, _dec_iq3_s, _dec_grid(False)[3]), K_IQ2_XS: _dec_iq2_xs_s(False), K_IQ2_S: _dec_iq2_xs_s(True), K_TQ2_0: (66, 256, _dec_tq2_0, _tok_tq2_0),
          K_IQ4_NL: _dec32(False), K_MXFP4: _dec32(True), K_IQ4_XS: (136, 256, _dec_iq4_xs, _tok_iq4_xs),
          K_IQ2_XXS: _dec_grid(False), K_IQ3_XXS: _dec_grid(True), **IQ1_SPECS}


def _block_token(e, b, ops, tok, w, xq_ptr, dx, acc):
    """acc + one block's contribution for one token: the same float operations in the one- and
    multi-token kernels (batch invariance)."""
    def xv(k):
        v = b.load(b.bitcast(b.gep(xq_ptr, [ir.Constant(I64, k)]), ir.PointerType(V(I8, 32))))
        v.align = 1
        return v
    isum, s = tok(e, b, ops, w, xv)
    sd = b.fmul(s, dx, flags=STRICT)
    return _fma(b, b.sitofp(isum, V(F32, 8)), e.splat(sd, 8), acc)


def _typer_one(kind):
    """Row of nb blocks against xq int8 [n], xd float32 [n / block] (xs unused) -> float32."""
    bb, bs, decode, tok = _SPECS[kind]

    def typer(typingctx, flat, o, nb, tab, xq, xd, xs):
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xqa, xda, _ = args
            fty, _, _, tty, xqty, xdty, _ = sig.args
            e = Emit(context, builder, fty, fa, tty, ta)
            ops = _Ops(builder, KV_FP4 if kind == K_MXFP4 else KV_IQ4)
            xqd = context.make_array(xqty)(context, builder, xqa).data
            xdd = context.make_array(xdty)(context, builder, xda).data
            acc = cgutils.alloca_once_value(builder, ir.Constant(V(F32, 8), [0.0] * 8))
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, bb)))
                e.prefetch(e.at(ob, PREFETCH_BYTES))
                w = decode(e, builder, ops, ob)
                xp = builder.gep(xqd, [builder.mul(b, ir.Constant(I64, bs))])
                dx = builder.load(builder.gep(xdd, [b]))
                builder.store(_block_token(e, builder, ops, tok, w, xp, dx, builder.load(acc)), acc)
            return _hsum_strict(e, builder.load(acc))
        return types.float32(flat, types.int64, types.int64, tab, xq, xd, xs), cg
    return typer


MULTI_MAX_T = 16


def _typer_multi(kind):
    """out[t, r] = row . x_t for the tn <= 16 token rows t0 <= t < t0 + tn of xq [T, n] /
    xd [T, n / block]: each block decoded once for the tn tokens, per token exactly the
    one-token kernel's arithmetic."""
    bb, bs, decode, tok = _SPECS[kind]

    def typer(typingctx, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn):
        def cg(context, builder, sig, args):
            fa, o_, nb_, ta, xqa, xda, _, outa, r_, t0_, tn_ = args
            fty, _, _, tty, xqty, xdty, _, outty = sig.args[:8]
            e = Emit(context, builder, fty, fa, tty, ta)
            ops = _Ops(builder, KV_FP4 if kind == K_MXFP4 else KV_IQ4)
            (xqs, n), (xds, ndx) = _rows_2d(context, builder, xqty, xqa), _rows_2d(context, builder, xdty, xda)
            outs, nout = _rows_2d(context, builder, outty, outa)
            accs = _token_accs(builder, V(F32, 8), tn_)
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                ob = builder.add(o_, builder.mul(b, ir.Constant(I64, bb)))
                e.prefetch(e.at(ob, PREFETCH_BYTES))
                w = decode(e, builder, ops, ob)
                with cgutils.for_range(builder, tn_) as lt:
                    t = builder.add(t0_, lt.index)
                    xp = builder.gep(xqs.data, [builder.add(builder.mul(t, n), builder.mul(b, ir.Constant(I64, bs)))])
                    dx = builder.load(builder.gep(xds.data, [builder.add(builder.mul(t, ndx), b)]))
                    ap = builder.gep(accs, [lt.index])
                    builder.store(_block_token(e, builder, ops, tok, w, xp, dx, builder.load(ap)), ap)
            _store_token_sums(e, builder, accs, tn_, t0_, outs, nout, r_)
            return context.get_dummy_value()
        return types.void(flat, types.int64, types.int64, tab, xq, xd, xs, out, types.int64, types.int64,
                          types.int64), cg
    return typer


# (kind, flat, o, nb, tab, xq, xd, xs) -> float32: one row against one quantized vector
dot_iq8_any = _by_kind({k: _typer_one(k) for k in _SPECS}, "dot_iq8_any", 7)
# (kind, flat, o, nb, tab, xq, xd, xs, out, r, t0, tn): one row against tn <= 16 vectors
dot_iq8_multi_any = _by_kind({k: _typer_multi(k) for k in _SPECS}, "dot_iq8_multi_any", 11)


def quant_iq(kind, X):
    """-> (xq, xd, xs): X quantized the way type `kind`'s rows read it (numba only)."""
    raise NotImplementedError


@overload(quant_iq, jit_options={"fastmath": True})
def _quant_iq(kind, X):
    if not isinstance(kind, types.IntegerLiteral):
        return None
    if kind.literal_value in _Q8K_KINDS:
        return lambda kind, X: quant_x_q8k(X)
    return lambda kind, X: quant_x_q8_32(X)


# -- drivers --------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=True)
def mv_iq8_parallel(kind, flat, offs, stride, nrows, nb, tab, X, xi, out):
    """out[i, r] = row r of the matrix at flat[offs[i]] . X[xi[i]] (matvec, gathered products),
    parallel over (matrix, 16-row chunk)."""
    literally(kind)
    xq, xd, xs = quant_iq(kind, X)
    nchunk = (nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in prange(offs.shape[0] * nchunk):
        i = it // nchunk
        r0 = (it - i * nchunk) * ROWS_PER_ITEM
        j = xi[i]
        for r in range(r0, min(nrows, r0 + ROWS_PER_ITEM)):
            out[i, r] = dot_iq8_any(kind, flat, offs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])


@njit(cache=True, fastmath=True)
def mv_iq8_serial(kind, flat, offs, stride, nrows, nb, tab, X, xi, out):
    literally(kind)
    xq, xd, xs = quant_iq(kind, X)
    for i in range(offs.shape[0]):
        j = xi[i]
        for r in range(nrows):
            out[i, r] = dot_iq8_any(kind, flat, offs[i] + r * stride, nb, tab, xq[j], xd[j], xs[j])


@njit(cache=True, inline="always")
def _mm_item(kind, flat, stride, nrows, nb, tab, xq, xd, xs, out, c):
    T = xq.shape[0]
    for r in range(c * ROWS_PER_ITEM, min(nrows, (c + 1) * ROWS_PER_ITEM)):
        for t0 in range(0, T, MULTI_MAX_T):
            dot_iq8_multi_any(kind, flat, r * stride, nb, tab, xq, xd, xs, out, r, t0, min(MULTI_MAX_T, T - t0))


@njit(cache=True, parallel=True, fastmath=True)
def mm_iq8_parallel(kind, flat, stride, nrows, nb, tab, X, out):
    """out (T, nrows) = X @ W.T for small T: per token exactly matvec's row kernel."""
    literally(kind)
    xq, xd, xs = quant_iq(kind, X)
    for c in prange((nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        _mm_item(kind, flat, stride, nrows, nb, tab, xq, xd, xs, out, c)


@njit(cache=True, fastmath=True)
def mm_iq8_serial(kind, flat, stride, nrows, nb, tab, X, out):
    literally(kind)
    xq, xd, xs = quant_iq(kind, X)
    for c in range((nrows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        _mm_item(kind, flat, stride, nrows, nb, tab, xq, xd, xs, out, c)


def quantized_x(ggml_type: int, X: np.ndarray):
    """(xq, xd) as the kernels of ggml_type see X (for tests): 32- or 256-element blocks."""
    xq, xd, _ = (quant_x_q8k if int(ggml_type) in _Q8K_KINDS else quant_x_q8_32)(np.ascontiguousarray(X, np.float32))
    return xq[:, :X.shape[1]], xd
