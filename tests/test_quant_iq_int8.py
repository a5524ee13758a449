"""IQ4_NL, IQ4_XS, MXFP4, IQ2_XXS, IQ3_XXS, IQ2_XS, IQ2_S, IQ3_S and TQ2_0 products with 8-bit
activations (shard/kernels/rows_iq8.py, issue 15): x quantized per 32 elements (IQ4_NL, MXFP4: llama.cpp's Q8_0) or per 256
(the super-block types: Q8_K), the non-linear 4-bit codes / grid rows and signs looked up as
int8 and multiplied with integer dot products.

Against the float64 product of gguf.quants.dequantize (not our decoder): every output within
the analytic bound of the activation rounding (tests/test_kernels._int8_bound's: each x_i moves
by at most half a step, max|x_block| / 254), and within float32 rounding of the float64 product
with the quantized x (computed here in numpy); bit-exact where every integer sum and scale
product is exact; matvec, gathered products (also a worker's row / column share), small
batches and short prompts (T <= products_iq.INT8_MAX_T; bit-identical rows to matvec's),
longer prompts (sgemm, float x), and DSD_EXACT_ACTIVATIONS' float path."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G

from dsd.shard import kernels
from dsd.shard.kernels import exact_activations, registry, rows_iq8

from .test_kernels import _int8_bound
from .test_quant_iq import random_raw, reference, set_scale

TYPES = [G.IQ4_NL, G.IQ4_XS, G.MXFP4, G.IQ2_XXS, G.IQ3_XXS, G.IQ2_XS, G.IQ2_S, G.IQ3_S, G.TQ2_0]

pytestmark = [pytest.mark.int8, pytest.mark.skipif(
    not registry.INT8_ACTIVATIONS, reason="no 8-bit activation kernels on this CPU (or DSD_EXACT_ACTIVATIONS=1)")]


def _blk(gt):
    return 32 if gt in (G.IQ4_NL, G.MXFP4) else 256


def quantized(X, blk):
    """llama.cpp's Q8_0 / Q8_K activations as the kernels compute them (rows_iq8.quantized_x),
    as float64, checked against an independent numpy quantization: x rounded to steps of
    max|x_block| / 127.  fastmath may compute 127 / max|x| and max|x| / 127 to within an ulp, so
    a value within an ulp of a rounding tie may round the other way: allowed for a few in 10^4."""
    T, n = X.shape
    xq, xd = rows_iq8.quantized_x(gt_of_blk(blk), X)
    xb = X.astype(np.float32).reshape(T, n // blk, blk)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127).reshape(T, n)
    diff = np.abs(q - xq)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * diff.size + 1
    np.testing.assert_allclose(xd[:, :n // blk], (amax / np.float32(127))[..., 0], rtol=3e-7)  # or an ulp off
    return (xq.astype(np.float64).reshape(T, n // blk, blk) * xd[:, :n // blk, None].astype(np.float64)).reshape(T, n)


def gt_of_blk(blk):
    return int(G.IQ4_XS if blk == 256 else G.IQ4_NL)


def check(got, W64, X, blk):
    """got [T, rows] vs the float64 products: within the 8-bit rounding bound of W @ x, and
    within float32 rounding (1e-5 of sum |w xq|) of W @ xq."""
    got = np.atleast_2d(got).astype(np.float64)
    X = np.atleast_2d(X)
    err = np.abs(got - X.astype(np.float64) @ W64.T)
    bound = _int8_bound(W64, X, blk).T
    assert np.all(err <= bound), (err / bound).max()
    assert err.mean() < 0.25 * bound.mean()
    Xq = quantized(X, blk)
    assert np.all(np.abs(got - Xq @ W64.T) <= 1e-5 * (np.abs(Xq) @ np.abs(W64).T) + 1e-30)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_matvec_and_small_batches_within_rounding_bound(gt, parallel, monkeypatch):
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 7 + parallel)
    n, blk = 1024, _blk(gt)
    raw = random_raw(gt, 203, n, rng)
    W = reference(raw, gt, n).astype(np.float64)
    for rows in (1, 7, 203):  # partial 16-row work items
        x = rng.standard_normal(n).astype(np.float32)
        x[blk:2 * blk] *= 40  # one block of large activations
        check(kernels.matvec(raw[:rows], int(gt), x), W[:rows], x, blk)
    X = rng.standard_normal((16, n)).astype(np.float32)
    X[1] *= 30
    alone = np.stack([kernels.matvec(raw, int(gt), X[t]) for t in range(16)])
    for T in (2, 8, 16):  # decode batches: each token through matvec's row kernel
        got = kernels.matmul(raw, int(gt), X[:T])
        check(got, W, X[:T], blk)
        assert np.array_equal(got, alone[:T]), T
    Xp = rng.standard_normal((40, n)).astype(np.float32)  # a short prompt: 8-bit x too
    check(kernels.matmul(raw, int(gt), Xp), W, Xp, blk)
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
    check(alone, reference(raw, gt, n).astype(np.float64), X, _blk(gt))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_gathered_products_and_worker_share(gt, parallel, monkeypatch):
    """Chosen matrices of an expert stack with their own vectors; a worker's share (rows 8:24,
    the second half of the columns: row stride > row bytes); the fused expert entry points."""
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 13 + parallel)
    bs, ts = GGML_QUANT_SIZES[gt]
    n, blk = 512, _blk(gt)
    stack = np.stack([random_raw(gt, 40, n, rng) for _ in range(4)])
    W = np.stack([reference(s, gt, n) for s in stack]).astype(np.float64)
    ids, xi = np.array([3, 1, 3, 0]), np.array([0, 1, 2, 1])
    X = rng.standard_normal((3, n)).astype(np.float32)
    got = kernels.matvec_gather(stack, int(gt), ids, X, xi)
    for i, (e, j) in enumerate(zip(ids, xi)):
        check(got[i], W[e], X[j], blk)
        assert np.array_equal(got[i], kernels.matvec(stack[e], int(gt), X[j]))
    h = n // 2
    sub = stack[:, 8:24, h // bs * ts:]
    Xh = np.ascontiguousarray(X[:, h:])
    got = kernels.matvec_gather(sub, int(gt), [2, 0], Xh, [0, 2])
    for i, (e, j) in enumerate(zip([2, 0], [0, 2])):
        check(got[i], W[e, 8:24, h:], Xh[j], blk)


def _kv(gt):
    from gguf import quants as gq
    return np.asarray((gq.MXFP4 if gt == G.MXFP4 else gq.IQ4_NL).kvalues, np.int64)


@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_bit_exact_integer_sums(gt):
    """Scales that make every step exact (d = 1 or 2^-1, random per 32-element scales, x integers
    with max|x| = 127 per activation block, so dx = 1): the product is the exact integer sum
    (IQ2_XXS / IQ3_XXS: an exact multiple of 1/8, 1/4), every code, grid row, sign pattern and
    x sign covered."""
    rng = np.random.default_rng(int(gt))
    bs, ts = GGML_QUANT_SIZES[gt]
    n, blk = 512, _blk(gt)
    raw = rng.integers(0, 256, size=(24, n // bs * ts), dtype=np.uint8)
    blocks = raw.reshape(-1, ts)
    if gt == G.MXFP4:
        set_scale(blocks, gt, np.full(blocks.shape[0], 127))  # 2^-1: kvalues are doubled
    else:
        set_scale(blocks, gt, np.full(blocks.shape[0], 0x3C00))  # fp16 1.0
    W = reference(raw, gt, n).astype(np.float64)
    x = rng.integers(-127, 128, size=n).astype(np.float32)
    x[::blk] = 127  # every activation block's max is 127: xq = x, dx = 1
    got = kernels.matvec(raw, int(gt), x)
    ref = W @ x.astype(np.float64)
    assert np.array_equal(got.astype(np.float64), ref)
    if gt == G.IQ4_NL:  # the extremes: every weight -127 against x = +-127
        blocks[:, 2:] = 0
        x = np.where(np.arange(n) % 3 == 0, -127, 127).astype(np.float32)
        got = kernels.matvec(raw, int(gt), x)
        assert np.array_equal(got.astype(np.float64), reference(raw, gt, n).astype(np.float64) @ x)


@pytest.mark.parametrize("gt", TYPES, ids=lambda g: g.name)
def test_exact_activations_keeps_float_x(gt):
    """exact_activations() (DSD_EXACT_ACTIVATIONS=1): float32 x, float32 rounding only."""
    rng = np.random.default_rng(int(gt) + 99)
    n = 512
    raw = random_raw(gt, 33, n, rng)
    W = reference(raw, gt, n).astype(np.float64)
    X = rng.standard_normal((3, n)).astype(np.float32)
    with exact_activations():
        for got in (kernels.matvec(raw, int(gt), X[0])[None], kernels.matmul(raw, int(gt), X)):
            ref = X[:got.shape[0]].astype(np.float64) @ W.T
            assert np.all(np.abs(got - ref) <= 1e-5 * (np.abs(X[:got.shape[0]].astype(np.float64)) @ np.abs(W).T))
    assert not np.array_equal(kernels.matvec(raw, int(gt), X[0]), _float(raw, gt, X[0]))


def _float(raw, gt, x):
    with exact_activations():
        return kernels.matvec(raw, int(gt), x)


def test_warm_up_loads_the_int8_kernels():
    assert registry.warm_up([int(t) for t in TYPES]) >= 0
