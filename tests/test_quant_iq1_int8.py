"""IQ1_S, IQ1_M and TQ1_0 products with 8-bit activations (shard/kernels/rows_iq1.py through
rows_iq8's kernels, issue 15): x quantized per 256 elements (llama.cpp's Q8_K), the IQ1 grid rows
with their delta folded in as int8 8 (g +- 1/8) and TQ1_0's base-3 digits minus 1 multiplied with
integer dot products.

As tests/test_quant_iq_int8.py, against the float64 product of gguf.quants.dequantize (not our
decoder): every output within the analytic bound of the activation rounding and within float32
rounding of the float64 product with the quantized x; bit-exact where every integer sum and
scale product is exact; matvec, gathered products (also a worker's row / column share), small
batches and short prompts (T <= products_iq.INT8_MAX_T; bit-identical rows to matvec's), longer
prompts (sgemm, float x), DSD_EXACT_ACTIVATIONS' float path; and the formats' edge cases: the
IQ1 delta sign bits (IQ1_S one per 32 elements, IQ1_M one per 8) and TQ1_0's ternary extremes
and every byte value.  Run once with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma,+f16c,
+bmi2,+popcnt for the AVX2 forms."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.shard import kernels
from dsd.shard.kernels import exact_activations, registry, rows_iq8

from .test_quant_iq import random_raw, reference, set_scale
from .test_quant_iq_int8 import check

TYPES = [G.IQ1_S, G.IQ1_M, G.TQ1_0]
BLK = 256  # x per 256 elements for all three (Q8_K)

pytestmark = pytest.mark.int8


def test_the_types_take_the_8bit_kernels():
    """On both CPU kinds of the project (AVX-512 VNNI, AVX2) the default path is the 8-bit one."""
    assert registry.INT8_ACTIVATIONS
    assert all(int(t) in rows_iq8.IQ8_KINDS for t in TYPES)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_matvec_and_small_batches_within_rounding_bound(gt, parallel, monkeypatch):
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 7 + parallel)
    n = 1024
    raw = random_raw(gt, 203, n, rng)  # W [203, 1024]
    W = reference(raw, gt, n).astype(np.float64)
    for rows in (1, 7, 203):  # partial 16-row work items
        x = rng.standard_normal(n).astype(np.float32)
        x[BLK:2 * BLK] *= 40  # one block of large activations
        check(kernels.matvec(raw[:rows], int(gt), x), W[:rows], x, BLK)
    X = rng.standard_normal((16, n)).astype(np.float32)
    X[1] *= 30
    alone = np.stack([kernels.matvec(raw, int(gt), X[t]) for t in range(16)])
    for T in (2, 5, 8, 16):  # decode batches: each token through matvec's row kernel
        got = kernels.matmul(raw, int(gt), X[:T])
        check(got, W, X[:T], BLK)
        assert np.array_equal(got, alone[:T]), T
    for T in (17, 40, 64):  # short prompts (<= INT8_MAX_T): 8-bit x, chunks of 16 tokens
        Xp = rng.standard_normal((T, n)).astype(np.float32)
        got = kernels.matmul(raw, int(gt), Xp)
        check(got, W, Xp, BLK)
        assert np.array_equal(got[T - 1], kernels.matvec(raw, int(gt), Xp[T - 1])), T
    Xp = rng.standard_normal((80, n)).astype(np.float32)  # a prompt: dequantize + sgemm, float x
    got = kernels.matmul(raw, int(gt), Xp).astype(np.float64)
    ref = Xp.astype(np.float64) @ W.T
    assert np.all(np.abs(got - ref) <= 1e-5 * (np.abs(Xp.astype(np.float64)) @ np.abs(W).T))


@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_batch_invariant_mode_every_T_equals_matvec(gt):
    rng = np.random.default_rng(int(gt) + 5)
    n = 512
    raw = random_raw(gt, 40, n, rng)
    X = rng.standard_normal((20, n)).astype(np.float32)
    with registry.batch_invariant():
        alone = np.stack([kernels.matvec(raw, int(gt), X[t]) for t in range(20)])
        for T in (3, 17, 20):
            assert np.array_equal(kernels.matmul(raw, int(gt), X[:T]), alone[:T]), T
    check(alone, reference(raw, gt, n).astype(np.float64), X, BLK)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_gathered_products_and_worker_share(gt, parallel, monkeypatch):
    """Chosen matrices of an expert stack [4, 40, 512] with their own vectors; a worker's share
    (rows 8:24, the second half of the columns: row stride > row bytes); the fused expert entry
    points (gate/up and down-sum) against the gathered products."""
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 13 + parallel)
    bs, ts = GGML_QUANT_SIZES[gt]
    n = 512
    stack = np.stack([random_raw(gt, 40, n, rng) for _ in range(4)])
    W = np.stack([reference(s, gt, n) for s in stack]).astype(np.float64)
    ids, xi = np.array([3, 1, 3, 0]), np.array([0, 1, 2, 1])
    X = rng.standard_normal((3, n)).astype(np.float32)
    got = kernels.matvec_gather(stack, int(gt), ids, X, xi)
    for i, (e, j) in enumerate(zip(ids, xi)):
        check(got[i], W[e], X[j], BLK)
        assert np.array_equal(got[i], kernels.matvec(stack[e], int(gt), X[j]))
    h = n // 2
    sub = stack[:, 8:24, h // bs * ts:]
    Xh = np.ascontiguousarray(X[:, h:])
    got = kernels.matvec_gather(sub, int(gt), [2, 0], Xh, [0, 2])
    for i, (e, j) in enumerate(zip([2, 0], [0, 2])):
        check(got[i], W[e, 8:24, h:], Xh[j], BLK)
    flat, mst, rst = registry.stack_view(stack)
    goffs, uoffs = np.array([0, 2]) * mst, np.array([1, 3]) * mst
    H = np.empty((2, 40), np.float32)
    registry.experts_gate_up(flat, goffs, uoffs, rst, 40, int(gt), n, X, np.array([0, 2]), H)
    g = kernels.matvec_gather(stack, int(gt), [0, 2], X, [0, 2])
    u = kernels.matvec_gather(stack, int(gt), [1, 3], X, [0, 2])
    np.testing.assert_allclose(H, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5, atol=1e-6)


def _exact_setup(gt, rng, rows=24, n=512):
    """Random blocks with fp16 d = 1 and integer x (|x| <= 127, max 127 in every 256-element
    block, so xq = x and dx = 1): every step exact, the product an exact multiple of 1/8."""
    bs, ts = GGML_QUANT_SIZES[gt]
    raw = rng.integers(0, 256, size=(rows, n // bs * ts), dtype=np.uint8)
    set_scale(raw.reshape(-1, ts), gt, np.full(raw.size // ts, 0x3C00))
    x = rng.integers(-127, 128, size=n).astype(np.float32)
    x[::BLK] = 127
    return raw, x


@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_bit_exact_integer_sums(gt):
    """Every grid row / digit byte, scale, delta sign and x sign (random bytes over 24 rows of
    2 super-blocks): the product equals the float64 one exactly."""
    rng = np.random.default_rng(int(gt))
    raw, x = _exact_setup(gt, rng)
    got = kernels.matvec(raw, int(gt), x)
    assert np.array_equal(got.astype(np.float64), reference(raw, gt, 512).astype(np.float64) @ x)
    X = np.stack([x, -x, np.roll(x, 256)])  # the multi-token kernel: the same exact sums
    got = kernels.matmul(raw, int(gt), X)
    assert np.array_equal(got.astype(np.float64), X.astype(np.float64) @ reference(raw, gt, 512).astype(np.float64).T)


def _iq1s_delta_neg(raw, ib_mask):
    """IQ1_S blocks [rows, k * 50]: set (True) / clear the delta sign (bit 15 of qh[ib], byte
    34 + 2 ib + 1 bit 7) of sub-block ib per ib_mask [8]."""
    b = raw.reshape(-1, 50)
    for ib in range(8):
        if ib_mask[ib]:
            b[:, 35 + 2 * ib] |= 0x80
        else:
            b[:, 35 + 2 * ib] &= 0x7F


def test_iq1_s_delta_sign_bit():
    """IQ1_S's delta (+-1/8 per 32 elements, bit 15 of each qh word): all clear, all set, every
    other sub-block; flipping sub-block ib's sign moves the product by exactly
    -2 * d (2 ls + 1) / 8 * sum of x over the sub-block (d = 1)."""
    rng = np.random.default_rng(41)
    raw, x = _exact_setup(G.IQ1_S, rng, rows=8, n=256)
    prods = {}
    for name, mask in (("clear", [0] * 8), ("set", [1] * 8), ("alt", [0, 1] * 4)):
        _iq1s_delta_neg(raw, mask)
        got = kernels.matvec(raw, int(G.IQ1_S), x)
        W = reference(raw, G.IQ1_S, 256).astype(np.float64)
        assert np.array_equal(got.astype(np.float64), W @ x), name
        prods[name] = got.astype(np.float64)
    ls = (raw.reshape(8, 50)[:, 35::2].astype(np.int64) >> 4) & 7  # [rows, 8] scale bits 12-14 of each qh word
    xs = x.reshape(8, 32).sum(axis=1).astype(np.float64)  # sum of x per sub-block [8]
    shift = -2 * (2 * ls + 1) / 8 * xs  # per row and sub-block: clear -> set
    np.testing.assert_array_equal(prods["set"] - prods["clear"], shift.sum(axis=1))
    np.testing.assert_array_equal(prods["alt"] - prods["clear"], shift[:, 1::2].sum(axis=1))


def test_iq1_m_delta_sign_bits():
    """IQ1_M's delta signs, one per 8 elements (bits 3 and 7 of each qh byte): all clear, all
    set, and one sign per group flipped at a time (group k's flip moves the product by exactly
    -2 * d (2 s + 1) / 8 * sum of its 8 x, d = 1)."""
    rng = np.random.default_rng(43)
    raw, x = _exact_setup(G.IQ1_M, rng, rows=4, n=256)
    b = raw.reshape(-1, 56)
    b[:, 32:48] &= 0x77
    clear = kernels.matvec(raw, int(G.IQ1_M), x).astype(np.float64)
    assert np.array_equal(clear, reference(raw, G.IQ1_M, 256).astype(np.float64) @ x)
    sw = b[:, 48:56].copy().view("<u2").astype(np.int64)  # scale words [rows, 4]
    for k in list(range(0, 32, 3)) + [31]:  # group k: qh byte 32 + k // 2, bit 3 or 7
        bit = 0x08 if k % 2 == 0 else 0x80
        b[:, 32 + k // 2] |= bit
        got = kernels.matvec(raw, int(G.IQ1_M), x).astype(np.float64)
        assert np.array_equal(got, reference(raw, G.IQ1_M, 256).astype(np.float64) @ x), k
        i = k // 2  # the 16-element half of group k, its 3-bit scale
        s = (sw[:, i // 4] >> (3 * (i % 4))) & 7
        np.testing.assert_array_equal(got - clear, -2 * (2 * s + 1) / 8 * x[8 * k:8 * k + 8].astype(np.float64).sum())
        b[:, 32 + k // 2] &= ~np.uint8(bit)
    b[:, 32:48] |= 0x88
    got = kernels.matvec(raw, int(G.IQ1_M), x).astype(np.float64)
    assert np.array_equal(got, reference(raw, G.IQ1_M, 256).astype(np.float64) @ x)


def _tq1_digits(byte, k):
    """The k base-3 digits of a TQ1_0 byte (gguf-py's decoding), each in 0 .. 2."""
    return [((int(byte) * 3 ** p % 256) * 3) >> 8 for p in range(k)]


def test_tq1_0_ternary_extremes_and_every_byte():
    """TQ1_0: all weights +1 (bytes whose digits are all 2) and all -1 (byte 0) against x = +-127
    (the largest |integer sum| of a block, 256 * 127); then every byte value 0 .. 255 in every
    qs / qh position of a block, against gguf-py exactly."""
    bs, ts = GGML_QUANT_SIZES[G.TQ1_0]
    full5 = [v for v in range(256) if _tq1_digits(v, 5) == [2] * 5]
    full4 = [v for v in range(256) if _tq1_digits(v, 4) == [2] * 4]
    assert full5 and full4 and _tq1_digits(0, 5) == [0] * 5
    n = 512
    x = np.where(np.arange(n) % 3 == 0, -127, 127).astype(np.float32)
    for name, q5, q4, w in (("plus", full5[0], full4[0], 1.0), ("minus", 0, 0, -1.0)):
        raw = np.zeros((3, n // bs * ts), np.uint8)
        b = raw.reshape(-1, ts)
        b[:, :48], b[:, 48:52] = q5, q4
        set_scale(b, G.TQ1_0, np.full(b.shape[0], 0x3C00))
        W = reference(raw, G.TQ1_0, n).astype(np.float64)
        assert np.all(W == w), name
        got = kernels.matvec(raw, int(G.TQ1_0), x)
        assert np.array_equal(got.astype(np.float64), W @ x), name
        assert np.array_equal(got.astype(np.float64), np.full(3, w * x.sum(dtype=np.float64))), name
        got = kernels.matvec(raw, int(G.TQ1_0), np.full(n, 127, np.float32))
        assert np.array_equal(got, np.full(3, w * 127 * n, np.float32)), name
    # every byte value at every qs / qh position: row r, byte j holds (r + 7 j) mod 256
    raw = np.zeros((256, ts), np.uint8)
    raw[:, :52] = (np.arange(256)[:, None] + 7 * np.arange(52)[None]) % 256
    set_scale(raw, G.TQ1_0, np.full(256, 0x3C00))
    rng = np.random.default_rng(47)
    xr = rng.integers(-127, 128, size=256).astype(np.float32)
    xr[0] = 127
    ref = reference(raw, G.TQ1_0, 256).astype(np.float64)
    assert np.array_equal(kernels.matvec(raw, int(G.TQ1_0), xr).astype(np.float64), ref @ xr)
    X = np.stack([xr, -xr])
    assert np.array_equal(kernels.matmul(raw, int(G.TQ1_0), X).astype(np.float64), X.astype(np.float64) @ ref.T)


@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_exact_activations_keeps_float_x(gt):
    """exact_activations() (DSD_EXACT_ACTIVATIONS=1): float32 x, float32 rounding only; the
    default (8-bit) path differs from it."""
    rng = np.random.default_rng(int(gt) + 99)
    n = 512
    raw = random_raw(gt, 33, n, rng)
    W = reference(raw, gt, n).astype(np.float64)
    X = rng.standard_normal((3, n)).astype(np.float32)
    with exact_activations():
        for got in (kernels.matvec(raw, int(gt), X[0])[None], kernels.matmul(raw, int(gt), X)):
            ref = X[:got.shape[0]].astype(np.float64) @ W.T
            assert np.all(np.abs(got - ref) <= 1e-5 * (np.abs(X[:got.shape[0]].astype(np.float64)) @ np.abs(W).T))
        exact = kernels.matvec(raw, int(gt), X[0])
    assert not np.array_equal(kernels.matvec(raw, int(gt), X[0]), exact)


def test_gguf_grid_is_the_one_folded_into_the_kernels():
    """rows_iq1's int8 table [4096, 8] is 8 * gguf-py's IQ1_S grid (shared by IQ1_M) plus the
    delta times 8: +1 for indices < 2048 (sign bit clear), -1 for the upper half."""
    from dsd.shard.kernels import rows_iq1
    gq.IQ1_S.init_grid()
    grid = np.asarray(gq.IQ1_S.grid, np.float64).reshape(2048, 8)
    tab = rows_iq1._GRID1D.astype("<u8").view(np.int8).reshape(4096, 8).astype(np.float64)
    np.testing.assert_array_equal(tab[:2048], 8 * (grid + gq.IQ1_S.delta))
    np.testing.assert_array_equal(tab[2048:], 8 * (grid - gq.IQ1_S.delta))


def test_warm_up_loads_the_int8_kernels():
    assert registry.warm_up([int(t) for t in TYPES]) >= 0
