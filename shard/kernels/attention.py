"""Single-token (decode) grouped-query attention over a heads-first float32/float16 KV cache.

Why not numpy: for one query the work is g*L dot products of length Dh plus g*L axpys; numpy's
batched matmul + softmax spends most of its ~100-200 us per layer in call overhead, temporaries
and a non-fused softmax. Why IR: a plain numba loop over d did not vectorise the Dh=64
reductions (measured 310 us); here the dot product is emitted as explicit <16 x float> LLVM
vector code (the rows.py technique), so it is SIMD on any x86-64 (SSE2 .. AVX-512).
Per kv head: QK over blocks of LBLOCK positions (each K chunk loaded once for up to 4 query
heads), a vector exp (Cephes expf) softmax left unnormalised, PV with register accumulators,
then the g output rows are scaled by 1/sum. Measured (SmolLM2 shapes, L=600, 2-core AVX2):
24-28 us hot vs ~100 us numpy; with 30 layers' caches cold 50-58 us float32, 28 us float16.

Shapes: q [H, Dk] float32 C-order; k [Hkv, L, Dk], v [Hkv, L, Dv] float32 (or float16, passed
to the numba functions as uint16 bit patterns) with contiguous inner
axis (any head/position stride, e.g. views of SequenceCache buffers [Hkv, cap, D], or two views
of one latent array for DeepSeek MLA); out [H, Dv]. Query head h uses kv head h // (H // Hkv).
Dk must be a multiple of 16 (callers fall back to numpy otherwise).

Optional (gpt-oss): `sinks` [H], one learned logit per query head that joins the softmax's
denominator only (softmax over [scores, sink], the sink's column dropped), and a sliding
`window` W: the query at position p sees keys p-W+1 .. p (llama.cpp LLAMA_SWA_TYPE_STANDARD,
transformers' sliding_window).  decode(..., sinks=None, window=0), the default, is the plain
kernel, bit-identical to before; causal_attention() is the numpy prompt path with both options.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .rows import Emit

F32, I32, I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
FAST = ("fast",)
V16 = ir.VectorType(F32, 16)


def _ptr(context, builder, aty, a, off):
    """float* to element `off` (counted from the array's data pointer, any layout)."""
    data = context.make_array(aty)(context, builder, a).data
    return builder.gep(data, [off])


def _ld16(builder, p, i):
    ld = builder.load(builder.bitcast(builder.gep(p, [ir.Constant(I64, 16 * i)]) if i else
                                      builder.bitcast(p, p.type), ir.PointerType(V16)))
    ld.align = 4
    return ld


def _ld16k(context, builder, aty, p):
    """16 K/V elements at p -> <16 x float>: float32 arrays load directly, uint16 arrays hold
    fp16 bit patterns (a float16 cache viewed as uint16; numba has no float16) and convert
    exactly (fpext half with F16C, else rows.Emit's integer bit trick), int16 arrays hold bf16
    bit patterns (a bf16 cache's uint16 storage viewed as int16, so the type tells the two
    apart): the bits shifted into a float32's high half."""
    if aty.dtype == types.float32:
        return _ld16(builder, p, 0)
    ld = builder.load(builder.bitcast(p, ir.PointerType(ir.VectorType(ir.IntType(16), 16))))
    ld.align = 2
    if aty.dtype == types.int16:
        w = builder.zext(ld, ir.VectorType(I32, 16))
        return builder.bitcast(builder.shl(w, ir.Constant(ir.VectorType(I32, 16), [16] * 16)), V16)
    e = object.__new__(Emit)
    e.b, e.f16c = builder, "+f16c" in context.codegen()._tm_features
    return e.half_to_f32(ld)


QK8_0, Q8_0_BYTES = 32, 34  # kv_cache.py's q8_0 blocks: fp16 scale d, then 32 int8 codes


def _ldrow(context, builder, aty, row, c):
    """Values c .. c+15 (c a multiple of 16) of the cached row starting at `row` -> <16 x float>.
    int8 arrays hold q8_0 rows (kv_cache.py): block c // 32 at byte 34 * (c // 32), its scale
    first, so a prefix of a row's blocks (MLA's V) is itself a row; the 16 codes times d."""
    if aty.dtype != types.int8:
        return _ld16k(context, builder, aty, builder.gep(row, [c]))
    b = builder.lshr(c, ir.Constant(I64, 5))
    base = builder.mul(b, ir.Constant(I64, Q8_0_BYTES))
    qp = builder.gep(row, [builder.add(base, builder.add(ir.Constant(I64, 2),
                                                             builder.and_(c, ir.Constant(I64, 31))))])
    q = builder.load(builder.bitcast(qp, ir.PointerType(ir.VectorType(ir.IntType(8), 16))))
    q.align = 1
    dp = builder.load(builder.bitcast(builder.gep(row, [base]), ir.PointerType(ir.IntType(16))))
    dp.align = 1
    e = object.__new__(Emit)
    e.b, e.f16c = builder, "+f16c" in context.codegen()._tm_features
    vec = builder.insert_element(ir.Constant(ir.VectorType(ir.IntType(16), 16), None), dp, ir.Constant(I32, 0))
    d = e.half_to_f32(builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(I32, 16), [0] * 16)))
    return builder.fmul(builder.sitofp(q, V16), d, flags=FAST)


def _hsum(builder, v):
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi, flags=FAST)
        n = h
    return builder.extract_element(v, ir.Constant(I32, 0))


def _splat(builder, x):
    vec = builder.insert_element(ir.Constant(V16, None), x, ir.Constant(I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(I32, 16), [0] * 16))


def _c16(x):
    return ir.Constant(V16, [x] * 16)


@intrinsic
def vexp_sum(typingctx, s, off, n, m):
    """s_flat[off:off+n16] <- exp(s - m) for the first n16 = n - n % 16 elements, returns their
    sum (float32). exp: Cephes expf (x = k ln2 + r, degree-6 polynomial, ~1 ulp), x clamped to
    >= -87 so 2^k stays normal (exp(-87) ~ 1e-38: negligible against the max term, which is 1)."""
    def cg(context, builder, sig, args):
        sa, off_, n_, m_ = args
        ps = _ptr(context, builder, sig.args[0], sa, off_)
        fl = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16, [V16]), "llvm.floor.v16f32")
        ms = _splat(builder, m_)
        acc = cgutils.alloca_once_value(builder, _c16(0.0))
        with cgutils.for_range(builder, builder.udiv(n_, ir.Constant(I64, 16))) as loop:
            pp = builder.bitcast(builder.gep(ps, [builder.mul(loop.index, ir.Constant(I64, 16))]),
                                 ir.PointerType(V16))
            x = builder.load(pp)
            x.align = 4
            x = builder.fsub(x, ms)
            x = builder.select(builder.fcmp_ordered("<", x, _c16(-87.0)), _c16(-87.0), x)
            kf = builder.call(fl, [builder.fadd(builder.fmul(x, _c16(1.44269504088896341)), _c16(0.5))])
            r = builder.fsub(x, builder.fmul(kf, _c16(0.693359375)))
            r = builder.fsub(r, builder.fmul(kf, _c16(-2.12194440e-4)))
            y = _c16(1.9875691500E-4)
            for c in (1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1):
                y = builder.fadd(builder.fmul(y, r, flags=FAST), _c16(c), flags=FAST)
            y = builder.fmul(y, builder.fmul(r, r, flags=FAST), flags=FAST)
            y = builder.fadd(builder.fadd(y, r, flags=FAST), _c16(1.0), flags=FAST)
            ki = builder.fptosi(kf, ir.VectorType(I32, 16))
            e2 = builder.bitcast(builder.shl(builder.add(ki, ir.Constant(ir.VectorType(I32, 16), [127] * 16)),
                                             ir.Constant(ir.VectorType(I32, 16), [23] * 16)), V16)
            y = builder.fmul(y, e2)
            builder.store(y, pp).align = 4
            builder.store(builder.fadd(builder.load(acc), y, flags=FAST), acc)
        return _hsum(builder, builder.load(acc))
    return types.float32(s, types.int64, types.int64, types.float32), cg


# K rows ahead that the QK kernel prefetches (and the PV kernel: one position block ahead):
# the KV rows of a head are a long sequential read that the hardware prefetchers restart at
# every 4 KiB page; as for the weight rows (rows.PREFETCH_BYTES), software prefetch keeps loads
# in flight.
PREFETCH_ROWS = 8


def _prefetch(builder, ptr):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(ir.IntType(8)), ir.IntType(32),
                                                          ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, ir.PointerType(ir.IntType(8))), ir.Constant(ir.IntType(32), 0),
                      ir.Constant(ir.IntType(32), 3), ir.Constant(ir.IntType(32), 1)])


LBLOCK = 64  # positions per pass of the PV kernel: their V rows stay in L1 across the Dv chunks


def make_pv(G):
    """Intrinsic (out, oo, v, vo, vs1, s, so, ss, L, Dv) -> 0: for G heads i,
    out_flat[oo + i*Dv : +Dv] += sum_l s_flat[so + i*ss + l] * v_flat[vo + l*vs1 : +Dv].
    G x 16-lane accumulators in registers per Dv chunk; each V chunk loaded once for G heads."""
    def typer(typingctx, out, oo, v, vo, vs1, s, so, ss, L, Dv):
        def cg(context, builder, sig, args):
            oa, oo_, va, vo_, vs1_, sa, so_, ss_, L_, Dv_ = args
            po = _ptr(context, builder, sig.args[0], oa, oo_)
            pv = _ptr(context, builder, sig.args[2], va, vo_)
            psrc = _ptr(context, builder, sig.args[5], sa, so_)
            accs = [cgutils.alloca_once_value(builder, _c16(0.0)) for _ in range(G)]
            lb = ir.Constant(I64, LBLOCK)
            nblk = builder.udiv(builder.add(L_, ir.Constant(I64, LBLOCK - 1)), lb)
            with cgutils.for_range(builder, nblk) as bl:
                l0 = builder.mul(bl.index, lb)
                l1 = builder.sub(L_, l0)
                nl = builder.select(builder.icmp_unsigned("<", l1, lb), l1, lb)
                with cgutils.for_range(builder, builder.udiv(Dv_, ir.Constant(I64, 16))) as cl:
                    c = builder.mul(cl.index, ir.Constant(I64, 16))
                    optr = [builder.bitcast(builder.gep(po, [builder.add(builder.mul(ir.Constant(I64, i), Dv_), c)]),
                                            ir.PointerType(V16)) for i in range(G)]
                    for i in range(G):
                        x = builder.load(optr[i])
                        x.align = 4
                        builder.store(x, accs[i])
                    with cgutils.for_range(builder, nl) as ll:
                        l = builder.add(l0, ll.index)
                        _prefetch(builder, builder.gep(pv, [builder.add(builder.mul(builder.add(l, lb), vs1_), c)]))
                        vv = _ldrow(context, builder, sig.args[2], builder.gep(pv, [builder.mul(l, vs1_)]), c)
                        for i in range(G):
                            p = builder.load(builder.gep(psrc, [builder.add(builder.mul(ir.Constant(I64, i), ss_), l)]))
                            builder.store(builder.fadd(builder.load(accs[i]), builder.fmul(_splat(builder, p), vv,
                                                       flags=FAST), flags=FAST), accs[i])
                    for i in range(G):
                        builder.store(builder.load(accs[i]), optr[i]).align = 4
            return ir.Constant(I64, 0)
        return types.int64(out, types.int64, v, types.int64, types.int64, s, types.int64, types.int64,
                           types.int64, types.int64), cg
    typer.__name__ = "pv%d" % G
    return intrinsic(typer)


def make_qk(G):
    """Intrinsic (k, ko, ks1, q, qo, s, so, ss, L, Dk, scale) -> 0: for G query heads i and
    positions l < L: s_flat[so + i*ss + l] = scale * (k_flat[ko + l*ks1 : +Dk] . q_flat[qo + i*Dk : +Dk]).
    Each K chunk is loaded once for the G heads (q stays in L1)."""
    def typer(typingctx, k, ko, ks1, q, qo, s, so, ss, L, Dk, scale):
        def cg(context, builder, sig, args):
            ka, ko_, ks1_, qa, qo_, sa, so_, ss_, L_, Dk_, sc = args
            pk = _ptr(context, builder, sig.args[0], ka, ko_)
            pq = _ptr(context, builder, sig.args[3], qa, qo_)
            psd = _ptr(context, builder, sig.args[5], sa, so_)
            accs = [cgutils.alloca_once_value(builder, _c16(0.0)) for _ in range(G)]
            with cgutils.for_range(builder, L_) as ll:
                l = ll.index
                krow = builder.gep(pk, [builder.mul(l, ks1_)])
                _prefetch(builder, builder.gep(pk, [builder.mul(builder.add(l, ir.Constant(I64, PREFETCH_ROWS)), ks1_)]))
                for i in range(G):
                    builder.store(_c16(0.0), accs[i])
                with cgutils.for_range(builder, builder.udiv(Dk_, ir.Constant(I64, 16))) as cl:
                    c = builder.mul(cl.index, ir.Constant(I64, 16))
                    kv = _ldrow(context, builder, sig.args[0], krow, c)
                    for i in range(G):
                        qv = _ld16(builder, builder.gep(pq, [builder.add(builder.mul(ir.Constant(I64, i), Dk_), c)]), 0)
                        builder.store(builder.fadd(builder.load(accs[i]), builder.fmul(kv, qv, flags=FAST),
                                                   flags=FAST), accs[i])
                for i in range(G):
                    r = builder.fmul(_hsum(builder, builder.load(accs[i])), sc, flags=FAST)
                    builder.store(r, builder.gep(psd, [builder.add(builder.mul(ir.Constant(I64, i), ss_), l)]))
            return ir.Constant(I64, 0)
        return types.int64(k, types.int64, types.int64, q, types.int64, s, types.int64, types.int64,
                           types.int64, types.int64, types.float32), cg
    typer.__name__ = "qk%d" % G
    return intrinsic(typer)


pv1, pv2, pv3, pv4 = (make_pv(G) for G in (1, 2, 3, 4))
qk1, qk2, qk3, qk4 = (make_qk(G) for G in (1, 2, 3, 4))


@njit(cache=True, fastmath=True, inline="always")
def _scores(k, q, qo0, s, ko0, ks1, Lmax, R, Dk, scale):
    """s[r, l] = scale * k[l] . q_flat[qo0 + r*Dk : +Dk] for r < R, l < Lmax (row groups of up to
    4 per K chunk; position blocks outer: a block of K rows stays in L1/L2 for every group)."""
    for l0 in range(0, Lmax, LBLOCK):
        nl = min(LBLOCK, Lmax - l0)
        ko = ko0 + l0 * ks1
        for r0 in range(0, R, 4):
            G = min(4, R - r0)
            so = r0 * Lmax + l0
            if G == 4:
                qk4(k, ko, ks1, q, qo0 + r0 * Dk, s, so, Lmax, nl, Dk, scale)
            elif G == 3:
                qk3(k, ko, ks1, q, qo0 + r0 * Dk, s, so, Lmax, nl, Dk, scale)
            elif G == 2:
                qk2(k, ko, ks1, q, qo0 + r0 * Dk, s, so, Lmax, nl, Dk, scale)
            else:
                qk1(k, ko, ks1, q, qo0 + r0 * Dk, s, so, Lmax, nl, Dk, scale)


@njit(cache=True, fastmath=True, inline="always")
def _weighted_values(v, s, out, oo0, vo0, vs1, Lmax, R, Dv):
    """out_flat[oo0 + r*Dv : +Dv] += sum_l s[r, l] * v[l] for r < R (row groups of up to 4 per V chunk)."""
    for l0 in range(0, Lmax, LBLOCK):
        nl = min(LBLOCK, Lmax - l0)
        vo = vo0 + l0 * vs1
        for r0 in range(0, R, 4):
            G = min(4, R - r0)
            so = r0 * Lmax + l0
            if G == 4:
                pv4(out, oo0 + r0 * Dv, v, vo, vs1, s, so, Lmax, nl, Dv)
            elif G == 3:
                pv3(out, oo0 + r0 * Dv, v, vo, vs1, s, so, Lmax, nl, Dv)
            elif G == 2:
                pv2(out, oo0 + r0 * Dv, v, vo, vs1, s, so, Lmax, nl, Dv)
            else:
                pv1(out, oo0 + r0 * Dv, v, vo, vs1, s, so, Lmax, nl, Dv)


@njit(cache=True, fastmath=True, inline="always")
def _head(q, k, v, scale, out, j, g, s):
    """kv head j: scores s [g, L] scratch (C-order); adds into out[j*g : (j+1)*g] (zeroed by
    the caller) the softmax-weighted sum of v. Query heads go in groups of up to 4."""
    mx = np.empty(g, np.float32)
    tot = np.empty(g, np.float32)
    _head_partial(q, k, v, scale, out, j, g, s, mx, tot)
    Dv = out.shape[1]
    for i in range(g):  # normalise the g output rows (Dv values) instead of g*L weights
        inv = np.float32(1.0) / tot[i]
        for d in range(Dv):
            out[j * g + i, d] *= inv


@njit(cache=True, fastmath=True, inline="always")
def _head_partial(q, k, v, scale, out, j, g, s, mx, tot):
    """_head without the final normalisation: adds sum_l exp(s_l - m) v_l into out's rows of kv
    head j and stores m (the max score) and sum_l exp(s_l - m) of each of its g query heads in
    mx[i] / tot[i] (the pieces a split over positions combines).  Query heads go in groups of
    up to 4 (the register-resident accumulators)."""
    L, Dk, Dv = k.shape[1], q.shape[1], out.shape[1]  # logical dims (q8_0 rows are wider in bytes)
    ks0, ks1 = k.strides[0] // k.itemsize, k.strides[1] // k.itemsize
    vs0, vs1 = v.strides[0] // v.itemsize, v.strides[1] // v.itemsize
    _scores(k, q, j * g * Dk, s, j * ks0, ks1, L, g, Dk, scale)
    n16 = L - L % 16
    for i in range(g):  # unnormalised softmax over positions, in place: exp(s - max)
        m = s[i, 0]
        for l in range(1, L):
            m = max(m, s[i, l])
        t = vexp_sum(s, i * L, L, m)
        for l in range(n16, L):
            e = np.exp(s[i, l] - m)
            s[i, l] = e
            t += e
        tot[i] = t
        mx[i] = m
    _weighted_values(v, s, out, j * g * Dv, j * vs0, vs1, L, g, Dv)


@njit(cache=True, fastmath=True)
def decode_serial(q, k, v, scale, out):
    """q [H, Dk] C, k [Hkv, L, Dk], v [Hkv, L, Dv] (inner axis contiguous), out [H, Dv] C."""
    Hkv, L = k.shape[0], k.shape[1]
    g = q.shape[0] // Hkv
    s = np.empty((g, L), np.float32)
    out[:, :] = 0.0
    for j in range(Hkv):
        _head(q, k, v, scale, out, j, g, s)


@njit(cache=True, fastmath=True, parallel=True)
def decode_split(q, k, v, scale, out, nsplit):
    """decode_serial split over (kv head, position range) work items so every thread has work
    (flash-decoding): each item's unnormalised partial sum, max and total are combined per query
    head with the log-sum-exp rule  out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) t_c."""
    Hkv, L = k.shape[0], k.shape[1]
    H, Dv = q.shape[0], out.shape[1]
    g = H // Hkv
    po = np.zeros((nsplit, H, Dv), np.float32)
    pm = np.full((nsplit, H), -np.inf, np.float32)
    pt = np.zeros((nsplit, H), np.float32)
    for it in prange(Hkv * nsplit):
        j = it // nsplit
        c = it - j * nsplit
        a = c * L // nsplit
        b = (c + 1) * L // nsplit
        if b > a:
            s = np.empty((g, b - a), np.float32)
            mx = np.empty(g, np.float32)
            tot = np.empty(g, np.float32)
            _head_partial(q, k[:, a:b], v[:, a:b], scale, po[c], j, g, s, mx, tot)
            for i in range(g):
                pm[c, j * g + i] = mx[i]
                pt[c, j * g + i] = tot[i]
    for h in range(H):
        M = pm[0, h]
        for c in range(1, nsplit):
            M = max(M, pm[c, h])
        den = np.float32(0)
        for d in range(Dv):
            out[h, d] = 0
        for c in range(nsplit):
            if pt[c, h] > 0:
                f = np.exp(pm[c, h] - M)
                den += f * pt[c, h]
                for d in range(Dv):
                    out[h, d] += f * po[c, h, d]
        inv = np.float32(1.0) / den
        for d in range(Dv):
            out[h, d] *= inv


# Positions per work item of decode_split: below this a split costs more (a parallel region,
# partial buffers, the combine) than the serial kernel spends on the keys.
SPLIT_MIN_POSITIONS = 128
# ... and below this many key + value bytes the serial kernel wins outright (measured, 2 threads,
# fp16 cache, 3 kv heads x 64: 512 positions (384 KiB) 26 us serial vs 48 us split, 1024
# positions 73 vs 39 us; one 576-wide MLA latent head at 512 positions (1.1 MiB) 310 vs 213 us)
SPLIT_MIN_BYTES = 512 * 1024


def n_splits(Hkv: int, L: int, threads: int) -> int:
    """Position ranges per kv head for decode_split (0: run decode_serial): enough (kv head,
    range) items for 2 per thread (an odd head count then still balances within one item),
    each of at least SPLIT_MIN_POSITIONS positions."""
    if threads < 2 or Hkv * L < 2 * SPLIT_MIN_POSITIONS:
        return 0
    want = -(-2 * threads // Hkv)
    return max(1, min(want, L // SPLIT_MIN_POSITIONS))


def kernel_arrays(k, v):
    """k, v as the numba kernels take them: float32 as is, float16 as uint16 bit patterns, a
    bf16 cache (kv_cache.KVRows) as int16 bit patterns, a q8_0 one as its int8 blocks."""
    t = getattr(k, "kv_type", None)
    if t is not None:
        if getattr(v, "kv_type", None) != t:
            raise TypeError(f"k is a {t} cache view but v is not")
        if t == "bf16":
            return k.raw.view(np.int16), v.raw.view(np.int16)
        return k.raw, v.raw
    if k.dtype == np.float16 and v.dtype == np.float16:
        return k.view(np.uint16), v.view(np.uint16)
    return k, v


def supported(q: np.ndarray, k, v) -> bool:
    """Shapes/layouts the kernels handle (else use the numpy path): q float32 [H, Dk]; k, v
    both float32, both float16 or both one bf16 / q8_0 cache's KVRows, inner axis contiguous,
    head dims multiples of 16 (q8_0: of its 32-value blocks)."""
    t = getattr(k, "kv_type", None)
    if t is not None:
        if getattr(v, "kv_type", None) != t:
            return False
    elif not (k.dtype == v.dtype and k.dtype in (np.float32, np.float16)):
        return False
    if not (q.dtype == np.float32 and q.ndim == 2 and k.ndim == 3 and v.ndim == 3):
        return False
    unit = 32 if t == "q8_0" else 16
    ka, va = kernel_arrays(k, v)
    it = ka.itemsize
    return (k.shape[2] % unit == 0 and v.shape[2] % unit == 0 and q.shape[-1] == k.shape[2]
            and ka.strides[2] == it and va.strides[2] == it and k.shape[1] > 0
            and ka.strides[0] % it == 0 and ka.strides[1] % it == 0
            and va.strides[0] % it == 0 and va.strides[1] % it == 0
            and v.shape[0] == k.shape[0] and v.shape[1] == k.shape[1]
            and q.shape[0] % k.shape[0] == 0)


def decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
           sinks: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """One query token: q [H, Dk] -> [H, Dv] (softmax(q k^T * scale) v per head).
    k, v float32, float16 (read as uint16 bit patterns) or a bf16 / q8_0 cache's KVRows (read in
    their stored form, kernel_arrays).  The query is at the last position:
    window > 0 keeps only the last `window` keys; sinks [H] (float) adds exp(sink_h) to head h's
    softmax denominator (see the module docstring).  Both default off: the plain kernels."""
    if window and window < k.shape[1]:
        L = k.shape[1]
        k, v = k[:, L - window:], v[:, L - window:]
    if sinks is not None:
        from .attention_sinks import decode_sinks

        return decode_sinks(q, k, v, scale, np.ascontiguousarray(sinks, dtype=np.float32).reshape(-1))
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((q.shape[0], v.shape[2]), np.float32)
    k, v = kernel_arrays(k, v)
    import numba

    from . import stats

    nsplit = n_splits(k.shape[0], k.shape[1], numba.get_num_threads())
    nbytes = k.shape[0] * k.shape[1] * (k.shape[2] + v.shape[2]) * k.itemsize  # keys + values read (stored bytes)
    if nbytes < SPLIT_MIN_BYTES:
        # a function of the shapes only (not of registry's timing back-off): the split sums in
        # another order, and a token's result must not depend on the machine's load
        nsplit = 0
    if stats.enabled:
        if nsplit:
            stats.timed("attention_decode_split", decode_split, q, k, v, np.float32(scale), out, nsplit)
        else:
            stats.timed("attention_decode_serial", decode_serial, q, k, v, np.float32(scale), out)
    elif nsplit:
        decode_split(q, k, v, np.float32(scale), out, nsplit)
    else:
        decode_serial(q, k, v, np.float32(scale), out)
    return out


ATTN_CHUNK = 128  # query rows per block of causal_attention's prompt path (as ops.ATTN_CHUNK)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, scale: float,
                     sinks: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """ops.attention with attention sinks and a sliding window (module docstring), any n:
    q [n, H, Dk] at positions q_pos0 .. q_pos0+n-1; k [Hkv, L, Dk], v [Hkv, L, Dv] hold positions
    0 .. L-1 (L = q_pos0 + n) -> [n, H, Dv] float32.  One query: the decode kernels when the shapes
    allow (supported()); batch-invariant mode: every query as that decode step; else numpy
    (float32 BLAS), in query chunks that read only the keys they can see."""
    from . import batch_invariant_mode

    n, H, _ = q.shape
    Hkv, L, _ = k.shape
    if n > 1 and batch_invariant_mode():
        out = np.empty((n, H, v.shape[-1]), dtype=np.float32)
        for i in range(n):
            end = q_pos0 + i + 1
            out[i] = causal_attention(q[i:i + 1], k[:, :end], v[:, :end], q_pos0 + i, scale, sinks, window)[0]
        return out
    if n == 1 and L == q_pos0 + 1 and supported(q[0], k, v):
        return decode(q[0], k, v, scale, sinks, window)[None]
    if sinks is None and not window:
        from .attention_prefill import prefill, prefill_supported

        if prefill_supported(q, k, v, q_pos0):   # the stored rows, read in place
            return prefill(q, k, v, q_pos0, scale)
    if n > ATTN_CHUNK:
        out = np.empty((n, H, v.shape[-1]), dtype=np.float32)
        for i0 in range(0, n, ATTN_CHUNK):
            i1 = min(n, i0 + ATTN_CHUNK)
            out[i0:i1] = causal_attention(q[i0:i1], k[:, :q_pos0 + i1], v[:, :q_pos0 + i1], q_pos0 + i0,
                                          scale, sinks, window)
        return out
    lo = max(0, q_pos0 - window + 1) if window else 0  # keys before lo are outside every window
    k, v = k[:, lo:].astype(np.float32, copy=False), v[:, lo:].astype(np.float32, copy=False)
    g = H // Hkv
    qg = q.reshape(n, Hkv, g, -1).transpose(1, 2, 0, 3).reshape(Hkv, g * n, -1)
    scores = np.matmul(qg, k.transpose(0, 2, 1))  # [Hkv, g*n, L - lo]
    scores *= np.float32(scale)
    kpos = lo + np.arange(L - lo)[None, :]
    qpos = (q_pos0 + np.arange(n))[:, None]
    vis = kpos <= qpos
    if window:
        vis &= kpos > qpos - window
    scores.reshape(Hkv, g, n, -1)[...] += np.where(vis, np.float32(0.0), np.float32(-np.inf))
    m = scores.max(axis=-1, keepdims=True)                       # [Hkv, g*n, 1]
    if sinks is not None:
        sk = np.repeat(np.asarray(sinks, np.float32).reshape(Hkv, g, 1), n, axis=2).reshape(Hkv, g * n, 1)
        m = np.maximum(m, sk)
    e = np.exp(scores - m)
    den = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        den += np.exp(sk - m)
    e /= den
    out = np.matmul(e, v)  # [Hkv, g*n, Dv]
    return out.reshape(Hkv, g, n, -1).transpose(2, 0, 1, 3).reshape(n, H, -1)


_KERNEL_DTYPE = {"f32": np.float32, "f16": np.uint16, "bf16": np.int16, "q8_0": np.int8}
_warmed: set = set()


def warm_up(kv_types=("f32", "f16")) -> None:
    """Load (or compile) both decode kernels for these cache types (default float32 and float16;
    kv_cache.SequenceCache warms bf16 / q8_0 when a cache of that type is made), on views shaped
    like the KV cache's (a position range of a [Hkv, capacity, D] buffer), so that the first long
    context does not compile decode_split in the middle of a request (~3 s)."""
    for t in kv_types:
        if t in _warmed:
            continue
        dt = _KERNEL_DTYPE[t]
        D = 32 if t == "q8_0" else 16
        q = np.zeros((2, D), np.float32)
        out = np.empty((2, D), np.float32)
        buf = np.zeros((1, 8, Q8_0_BYTES if t == "q8_0" else 16), dt)
        k = v = buf[:, :4]
        decode_serial(q, k, v, np.float32(1.0), out)
        decode_split(q, k, v, np.float32(1.0), out, 2)
        from .attention_prefill import prefill_kernel   # prompt chunks (attention_prefill.py)

        prefill_kernel(q.reshape(2, 1, D), k, v, np.float32(1.0), out.reshape(2, 1, D), 2, 1)
        if t == "q8_0":   # and the row encoder append() uses
            from .kv_encode import encode_q8_0

            encode_q8_0(np.zeros((1, 32), np.float32), np.empty((1, Q8_0_BYTES), np.int8))
        elif t == "bf16":
            from .kv_encode import encode_bf16

            encode_bf16(np.zeros(1, np.uint32), np.empty(1, np.uint16))
        _warmed.add(t)


def warm_up_kv_type(kv_type: str) -> None:
    """warm_up for one cache type, once per process (SequenceCache calls it for bf16 / q8_0)."""
    if kv_type not in _warmed:
        warm_up((kv_type,))
