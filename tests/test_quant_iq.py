"""The low-bit GGUF types (IQ1_S ... IQ4_XS, MXFP4, TQ1_0, TQ2_0; issue 15): dequantization
bit-exact with gguf-py's numpy reference (gguf.quants.dequantize, which we did not write) on
random blocks and on constructed edge cases, and products against a float64 numpy product of
that reference.

Block layouts (bytes, little endian; from gguf-py / ggml-common.h) that the edge cases poke at:
  IQ2_XXS 66: d f16 | 8 x (4 grid bytes, u32: 4 x 7-bit sign index | 4-bit scale << 28)
  IQ2_XS  74: d | 32 x u16 (9-bit grid index | 7-bit sign index << 9) | scales[8]
  IQ2_S   82: d | qs[32] | signs[32] (a byte per 8 elements) | qh[8] | scales[8]
  IQ3_XXS 98: d | qs[64] | 8 x u32 (4 x 7-bit sign index | scale << 28)
  IQ3_S  110: d | qs[64] | qh[8] | signs[32] (a nibble per 4 elements) | scales[4]
  IQ1_S   50: d | qs[32] | 8 x u16 qh (3 x 4 high index bits | scale << 12 | delta sign << 15)
  IQ1_M   56: qs[32] | qh[16] (nibble: 3 high index bits | delta sign << 3) | 4 x u16 scales
              whose top nibbles are the fp16 d
  IQ4_NL  18: d | qs[16];  IQ4_XS 136: d | scales_h u16 | scales_l[4] | qs[128]
  MXFP4   17: E8M0 exponent | qs[16];  TQ1_0 54: qs[48] | qh[4] | d;  TQ2_0 66: qs[64] | d
"""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.errors import DsdError
from dsd.shard import kernels
from dsd.shard.kernels import registry

IQ = [G.IQ1_S, G.IQ1_M, G.IQ2_XXS, G.IQ2_XS, G.IQ2_S, G.IQ3_XXS, G.IQ3_S, G.IQ4_NL, G.IQ4_XS,
      G.MXFP4, G.TQ1_0, G.TQ2_0]
# byte offset of the fp16 scale d in a block (IQ1_M and MXFP4 have none: see set_scale)
F16_AT = {G.IQ1_S: 0, G.IQ2_XXS: 0, G.IQ2_XS: 0, G.IQ2_S: 0, G.IQ3_XXS: 0, G.IQ3_S: 0, G.IQ4_NL: 0,
          G.IQ4_XS: 0, G.TQ1_0: 52, G.TQ2_0: 64}


def set_scale(blocks: np.ndarray, gt, bits: np.ndarray) -> None:
    """blocks uint8 [n, type_size] <- fp16 scale bit patterns bits uint16 [n] (MXFP4: E8M0 bytes)."""
    if gt == G.MXFP4:
        blocks[:, 0] = bits.astype(np.uint8)
    elif gt == G.IQ1_M:
        for i in range(4):  # nibble i of d = top nibble of scales u16 i (its high byte 49 + 2 i)
            nib = ((bits >> (4 * i)) & 15).astype(np.uint8)
            blocks[:, 49 + 2 * i] = (blocks[:, 49 + 2 * i] & 0x0F) | (nib << 4)
    else:
        o = F16_AT[gt]
        blocks[:, o:o + 2] = bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def random_raw(gt, rows: int, n_cols: int, rng) -> np.ndarray:
    """(rows, row_bytes) random bytes with sane scales: fp16 d ~ N(0, 0.05), MXFP4 exponents
    2^-10 .. 2^-2 (what a quantizer writes for weights of size ~0.01-1)."""
    bs, ts = GGML_QUANT_SIZES[gt]
    raw = rng.integers(0, 256, size=(rows, n_cols // bs * ts), dtype=np.uint8)
    blocks = raw.reshape(-1, ts)
    if gt == G.MXFP4:
        set_scale(blocks, gt, rng.integers(118, 127, size=blocks.shape[0]))
    else:
        d = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16)
        set_scale(blocks, gt, d.view(np.uint16))
    return raw


def reference(raw: np.ndarray, gt, n_cols: int) -> np.ndarray:
    return np.asarray(gq.dequantize(np.ascontiguousarray(raw), gt), dtype=np.float32).reshape(raw.shape[0], n_cols)


def assert_bits_equal(got, ref):
    """Same float32 bit patterns; NaNs (from NaN scales) only need to be NaN in both."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bad = np.flatnonzero((got.view(np.uint32) != ref.view(np.uint32)) & ~nan)
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[0]}: {got.flat[bad[0]]} vs {ref.flat[bad[0]]}"


def deq(raw, gt, n_cols):
    return kernels.dequantize(raw, int(gt), n_cols)


def _blocks(gt, n, rng):
    bs, ts = GGML_QUANT_SIZES[gt]
    return random_raw(gt, n, bs, rng).reshape(n, ts)


def _check_blocks(gt, blocks):
    """Each block as one row of block_size elements, against the reference."""
    bs, _ = GGML_QUANT_SIZES[gt]
    assert_bits_equal(deq(blocks, gt, bs), reference(blocks, gt, bs))


# -- dequantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("sanitised", [True, False], ids=["sane-scales", "any-bytes"])
@pytest.mark.parametrize("gt", IQ, ids=lambda g: g.name)
def test_dequantize_random_blocks_bit_exact(gt, sanitised):
    """2048 blocks of random bytes: with 32 grid lookups per super-block every grid row (IQ1_S's
    2048, IQ2_S's 1024) is hit with overwhelming probability.  any-bytes: the scale fields too
    (subnormal, huge, inf and NaN fp16 scales; MXFP4 exponents up to 255)."""
    rng = np.random.default_rng(int(gt) * 31 + sanitised)
    bs, ts = GGML_QUANT_SIZES[gt]
    n_cols = 16 * bs
    raw = random_raw(gt, 2048 // 16, n_cols, rng)
    if not sanitised:
        raw = rng.integers(0, 256, size=raw.shape, dtype=np.uint8)
    assert_bits_equal(deq(raw, gt, n_cols), reference(raw, gt, n_cols))


@pytest.mark.parametrize("gt", IQ, ids=lambda g: g.name)
def test_dequantize_extreme_scales(gt):
    """The largest and smallest fp16 scales of either sign (65504, the smallest subnormal and
    normal, zero, -0), and for MXFP4 every E8M0 exponent 0..255 (scale 2^(e - 127): e = 0 is a
    float32 subnormal, e = 254 the largest scale 2^127, where codes >= 2.0 overflow to inf as
    in ggml)."""
    rng = np.random.default_rng(int(gt) + 500)
    if gt == G.MXFP4:
        bits = np.arange(256, dtype=np.uint16)
    else:
        bits = np.array([0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0400, 0x8400, 0x3C00, 0x0000, 0x8000],
                        dtype=np.uint16).repeat(4)
    blocks = _blocks(gt, bits.shape[0], rng)
    set_scale(blocks, gt, bits)
    _check_blocks(gt, blocks)
    got = deq(blocks, gt, GGML_QUANT_SIZES[gt][0])
    if gt == G.MXFP4:
        # independent of gguf-py: 2^(e - 127) * the E2M1 value; byte 0x72 = codes 2 (1.0, element
        # 0) and 7 (6.0, element 16)
        blocks[:, 1:] = 0x72
        got = deq(blocks, gt, 32).astype(np.float64)
        e = np.arange(256)
        assert np.array_equal(got[:255, 0], np.ldexp(1.0, e[:255] - 127))  # e = 0 .. 254
        assert np.array_equal(got[:253, 16], np.ldexp(6.0, e[:253] - 127))  # 6 * 2^125 < 2^128
        assert got[0, 0] == 2.0 ** -127 and got[254, 0] == 2.0 ** 127 and np.isinf(got[253:255, 16]).all()
    else:
        assert np.isfinite(got).all() and (got[-8:] == 0).all()  # scales 0 and -0 give zeros


def _sign_blocks(gt, rng):
    """Blocks whose sign fields take every value: IQ2_XXS / IQ3_XXS / IQ2_XS 7-bit indices into
    KSIGNS 0..127, IQ2_S sign bytes 0..255, IQ3_S sign nibbles 0..15 in every byte (0..255)."""
    nblk = {G.IQ2_XXS: 4, G.IQ3_XXS: 4, G.IQ2_XS: 4, G.IQ2_S: 8, G.IQ3_S: 8}[gt]
    blocks = _blocks(gt, nblk, rng)
    for b in range(nblk):
        blk = blocks[b]
        if gt in (G.IQ2_XXS, G.IQ3_XXS):
            at = [2 + 8 * ib + 4 for ib in range(8)] if gt == G.IQ2_XXS else [66 + 4 * ib for ib in range(8)]
            for ib, o in enumerate(at):
                aux = int(blk[o:o + 4].view("<u4")[0]) & 0xF0000000
                for l in range(4):
                    aux |= ((32 * b + 4 * ib + l) % 128) << (7 * l)
                blk[o:o + 4] = np.array([aux], "<u4").view(np.uint8)
        elif gt == G.IQ2_XS:
            qs = blk[2:66].view("<u2")
            qs[:] = (qs & 511) | (((32 * b + np.arange(32)) % 128) << 9).astype(np.uint16)
        elif gt == G.IQ2_S:
            blk[34:66] = (32 * b + np.arange(32)) % 256
        else:
            blk[74:106] = (32 * b + np.arange(32)) % 256
    return blocks


@pytest.mark.parametrize("gt", [G.IQ2_XXS, G.IQ2_XS, G.IQ2_S, G.IQ3_XXS, G.IQ3_S], ids=lambda g: g.name)
def test_dequantize_every_sign_pattern(gt):
    blocks = _sign_blocks(gt, np.random.default_rng(int(gt) + 600))
    _check_blocks(gt, blocks)
    # and the signs really flip: the same blocks with every sign field zeroed
    plain = blocks.copy()
    if gt in (G.IQ2_XXS, G.IQ3_XXS):
        for ib in range(8):
            o = 2 + 8 * ib + 4 if gt == G.IQ2_XXS else 66 + 4 * ib
            plain[:, o:o + 4] = (plain[:, o:o + 4].copy().view("<u4") & 0xF0000000).view(np.uint8)
    elif gt == G.IQ2_XS:
        plain[:, 2:66] = (plain[:, 2:66].copy().view("<u2") & 511).view(np.uint8)
    else:
        plain[:, slice(34, 66) if gt == G.IQ2_S else slice(74, 106)] = 0
    bs = GGML_QUANT_SIZES[gt][0]
    a, p = deq(blocks, gt, bs), deq(plain, gt, bs)
    assert np.array_equal(np.abs(a), np.abs(p))
    assert (np.signbit(a) != np.signbit(p)).sum() > bs  # many elements negated


@pytest.mark.parametrize("gt", [G.IQ1_S, G.IQ1_M], ids=lambda g: g.name)
def test_iq1_delta_sign_bit(gt):
    """IQ1_S: bit 15 of each sub-block's qh; IQ1_M: bit 3 of each 8-element group's qh nibble.
    Both values of every such bit, and the delta is +-1/8 of the sub-block scale."""
    rng = np.random.default_rng(int(gt) + 700)
    blocks = _blocks(gt, 16, rng)
    set_scale(blocks, gt, np.full(16, 0x3C00, np.uint16))  # d = 1
    on, off = blocks.copy(), blocks.copy()
    if gt == G.IQ1_S:
        on[:, 35:50:2] |= 0x80
        off[:, 35:50:2] &= 0x7F
    else:
        on[:, 32:48] |= 0x88
        off[:, 32:48] &= 0x77
    mixed = np.where(rng.integers(0, 2, size=on.shape).astype(bool), on, off)  # bits at random
    for b in (on, off, mixed):
        _check_blocks(gt, b)
    a, z = deq(on, gt, 256), deq(off, gt, 256)
    # same grid and scales: the difference is -2/8 of the sub-block scale (1, 3, .. 15 times d)
    diff = (a - z).astype(np.float64) / -0.25
    assert np.all(np.isin(np.round(diff, 6), np.arange(1, 16, 2)))


def test_iq4_and_fp4_every_code():
    """Every 4-bit code at every nibble position (IQ4_NL's non-linear table, MXFP4's E2M1 values)
    and every IQ4_XS 6-bit sub-block scale (0 .. 63, i.e. -32 .. 31)."""
    rng = np.random.default_rng(800)
    for gt in (G.IQ4_NL, G.MXFP4, G.IQ4_XS):
        blocks = _blocks(gt, 64, rng)
        q0 = {G.IQ4_NL: 2, G.MXFP4: 1, G.IQ4_XS: 8}[gt]
        nq = blocks.shape[1] - q0
        blocks[:, q0:] = (np.arange(64)[:, None] + np.arange(nq)[None, :] * 17) % 256
        if gt == G.IQ4_XS:
            # block b, sub-block ib: scale (b + ib) % 64 split in its low nibble and 2 high bits
            s = (np.arange(64)[:, None] + np.arange(8)[None, :]) % 64
            lo, hi = s & 15, s >> 4
            blocks[:, 4:8] = (lo[:, 0::2] | (lo[:, 1::2] << 4)).astype(np.uint8)
            blocks[:, 2:4] = (hi << (2 * np.arange(8))).sum(axis=1).astype("<u2")[:, None].view(np.uint8)
        _check_blocks(gt, blocks)
    # independent of gguf-py: IQ4_NL with d = 1 and bytes 0x10 * k + k gives kvalues[k]
    b = np.zeros((16, 18), np.uint8)
    b[:, 0:2] = np.array([0x3C00], "<u2").view(np.uint8)
    b[:, 2:] = (np.arange(16) * 0x11)[:, None]
    kv = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    assert np.array_equal(deq(b, G.IQ4_NL, 32), np.repeat(np.array(kv, np.float32)[:, None], 32, axis=1))


@pytest.mark.parametrize("gt", [G.TQ1_0, G.TQ2_0], ids=lambda g: g.name)
def test_ternary_extremes(gt):
    """All -1, all 0, all +1 (TQ1_0 bytes 0x00, 0x80 = trits 11111 and 0xFF = 22222; TQ2_0 bytes
    0x00, 0x55, 0xAA) give exactly -d, 0, +d; TQ2_0's unused code 3 gives 2d as in ggml; and
    every byte value at every position against the reference."""
    rng = np.random.default_rng(int(gt) + 900)
    ts = GGML_QUANT_SIZES[gt][1]
    nq = ts - 2
    d = np.float16(0.375)
    codes = {G.TQ1_0: (0x00, 0x80, 0xFF), G.TQ2_0: (0x00, 0x55, 0xAA)}[gt] + (0xFF,)
    blocks = np.zeros((4, ts), np.uint8)
    for i, c in enumerate(codes):
        blocks[i, :nq] = c
    set_scale(blocks, gt, np.full(4, d, np.float16).view(np.uint16))
    got = deq(blocks, gt, 256)
    assert np.all(got[0] == -np.float32(d)) and np.all(got[1] == 0) and np.all(got[2] == np.float32(d))
    assert np.all(got[3] == (2 if gt == G.TQ2_0 else 1) * np.float32(d))
    _check_blocks(gt, blocks)
    every = _blocks(gt, 256, rng)
    every[:, :nq] = (np.arange(256)[:, None] + 37 * np.arange(nq)[None, :]) % 256
    _check_blocks(gt, every)


def test_column_slice_and_bad_rows():
    """A block-aligned column slice of a wider matrix (row stride > row bytes) decodes as the
    wide matrix's columns; a row that is not whole blocks is refused, not misread."""
    rng = np.random.default_rng(1000)
    for gt in IQ:
        bs, ts = GGML_QUANT_SIZES[gt]
        wide = random_raw(gt, 5, 6 * bs, rng)
        ref = reference(wide, gt, 6 * bs)
        assert_bits_equal(deq(wide[:, 2 * ts:5 * ts], gt, 3 * bs), ref[:, 2 * bs:5 * bs])
        with pytest.raises(DsdError, match="block size"):
            deq(wide, gt, 6 * bs - 16)


# -- products ------------------------------------------------------------------------------------
# float32 activations here (exactly decoded weights, float32 rounding only); the 8-bit
# activation kernels of IQ4_NL / IQ4_XS / MXFP4 are tests/test_quant_iq_int8.py's

@pytest.fixture(autouse=True)
def _float_activations(monkeypatch):
    monkeypatch.setattr(registry, "INT8_ACTIVATIONS", False)


def assert_close_product(got, ref64, bound):
    """float32 accumulation of exactly decoded weights: far below 1e-5 of sum |w x|."""
    err = np.abs(got.astype(np.float64) - ref64)
    assert np.all(err <= 1e-5 * bound + 1e-30), (err / (bound + 1e-30)).max()


def _product_case(gt, seed, rows=203, blocks=4):
    rng = np.random.default_rng(seed)
    bs = GGML_QUANT_SIZES[gt][0]
    n = blocks * bs if bs == 256 else 8 * blocks * bs  # 1024 columns for 256- and 32-blocks
    raw = random_raw(gt, rows, n, rng)
    return rng, n, raw, reference(raw, gt, n).astype(np.float64)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", IQ, ids=lambda g: g.name)
def test_matvec_and_matmul_match_float64(gt, parallel, monkeypatch):
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng, n, raw, W = _product_case(gt, int(gt) * 11 + parallel)
    for rows in (1, 7, 203):  # odd counts: partial 16-row work items
        x = rng.standard_normal(n).astype(np.float32)
        got = kernels.matvec(raw[:rows], int(gt), x)
        assert got.shape == (rows,)
        assert_close_product(got, W[:rows] @ x, np.abs(W[:rows]) @ np.abs(x))
    for T in (2, 8, 40):  # a decode batch, the fused kernel, a prompt (dequantize + sgemm)
        X = rng.standard_normal((T, n)).astype(np.float32)
        X[1] *= 30
        out = np.full((T, raw.shape[0]), np.nan, np.float32)
        assert kernels.matmul(raw, int(gt), X, out=out) is out
        assert_close_product(out, X.astype(np.float64) @ W.T, np.abs(X.astype(np.float64)) @ np.abs(W).T)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", IQ, ids=lambda g: g.name)
def test_matvec_gather_matches_float64(gt, parallel, monkeypatch):
    """Chosen matrices of an expert stack with their own vectors, and a worker's share (rows
    8:24, the second half of the columns: a view with row stride > row bytes)."""
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 13 + parallel)
    bs, ts = GGML_QUANT_SIZES[gt]
    n = 512 if bs == 256 else 256
    stack = np.stack([random_raw(gt, 40, n, rng) for _ in range(4)])
    W = np.stack([reference(s, gt, n) for s in stack]).astype(np.float64)
    ids, xi = np.array([3, 1, 3, 0]), np.array([0, 1, 2, 1])
    X = rng.standard_normal((3, n)).astype(np.float32)

    def gather(st, X, ids, xi):
        return kernels.matvec_gather(st, int(gt), ids, X, xi)

    got = gather(stack, X, ids, xi)
    for i, (e, j) in enumerate(zip(ids, xi)):
        assert_close_product(got[i], W[e] @ X[j], np.abs(W[e]) @ np.abs(X[j]))
    h = n // 2
    sub = stack[:, 8:24, h // bs * ts:]
    Xh = np.ascontiguousarray(X[:, h:])
    got = gather(sub, Xh, [2, 0], [0, 2])
    for i, (e, j) in enumerate(zip([2, 0], [0, 2])):
        assert_close_product(got[i], W[e, 8:24, h:] @ Xh[j], np.abs(W[e, 8:24, h:]) @ np.abs(Xh[j]))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", [G.IQ2_XXS, G.IQ4_NL, G.MXFP4, G.TQ1_0], ids=lambda g: g.name)
def test_batch_invariant_rows_equal_matvec(gt, parallel, monkeypatch):
    """registry.BATCH_INVARIANT: a token's row of matmul is bit-identical to matvec on it alone,
    whatever T (the fused small-batch kernel and sgemm are not: they are switched off)."""
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng, n, raw, _ = _product_case(gt, int(gt) + 1100, rows=40)
    X = rng.standard_normal((40, n)).astype(np.float32)
    X[3] *= 40
    with registry.batch_invariant():
        alone = np.stack([kernels.matvec(raw, int(gt), X[t]) for t in range(40)])
        for T in (2, 3, 8, 16, 17, 40):
            got = kernels.matmul(raw, int(gt), X[:T])
            assert np.array_equal(got, alone[:T]), T


# -- the model paths: fused experts, fused linears, embedding lookup, warm-up ------------------

@pytest.mark.parametrize("gt", [G.IQ1_M, G.IQ3_XXS, G.MXFP4, G.TQ2_0], ids=lambda g: g.name)
def test_fused_experts_and_fused_linear_equal_separate_calls(gt, monkeypatch):
    """weights.FusedExperts (registry.experts_gate_up / experts_down_sum) equals the gathered
    path bit for bit and the float64 product of the reference weights; weights.FusedLinear
    (registry.matvec_offsets over row chunks of one buffer) equals separate matvecs bit for bit."""
    from dsd.shard import ops
    from dsd.shard.weights import ExpertStack, FusedExperts, FusedLinear, Linear

    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0)
    rng = np.random.default_rng(int(gt) + 1200)
    bs, ts = GGML_QUANT_SIZES[gt]
    D, F, E = 256, 512 if bs == 256 else 256, 4
    buf = random_raw(gt, 2 * E * F, D, rng)  # gate and up stacks in one buffer
    gate, up = (ExpertStack(buf[i * E * F:(i + 1) * E * F].reshape(E, F, -1), int(gt), D) for i in range(2))
    down = ExpertStack(random_raw(gt, E * D, F, rng).reshape(E, D, -1), int(gt), F)
    fused = FusedExperts(gate, up, down)
    assert fused.ok
    x = rng.standard_normal((3, D)).astype(np.float32)
    pe, tok = [2, 0, 3, 2, 1], np.array([0, 0, 1, 2, 2])
    w = rng.uniform(0.1, 1, size=5).astype(np.float32)
    got = fused(x, pe, tok, w)
    h = ops.silu_mul(gate.gather(pe, x, tok), up.gather(pe, x, tok))
    y = down.gather(pe, h) * w[:, None]
    want = np.stack([y[tok == t].sum(axis=0) for t in range(3)])
    np.testing.assert_array_equal(got, want)
    Wg, Wu, Wd = (np.stack([reference(st.raw[e], gt, st.cols) for e in range(E)]).astype(np.float64)
                  for st in (gate, up, down))
    ref = np.zeros((3, D))
    for p, (e, t) in enumerate(zip(pe, tok)):
        a = Wg[e] @ x[t]
        ref[t] += w[p] * (Wd[e] @ ((a / (1 + np.exp(-a))) * (Wu[e] @ x[t])))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    lins = [Linear(buf[:96], int(gt), D), Linear(buf[96:160], int(gt), D), Linear(buf[160:480], int(gt), D)]
    fl = FusedLinear(lins)
    assert fl.fused
    for a, b in zip(fl(x[:1]), lins):
        np.testing.assert_array_equal(a[0], kernels.matvec(b.raw, int(gt), x[0]))


def test_embedding_lookup_and_warm_up():
    """Token embedding rows of every type dequantize as the reference's rows (a row lookup
    through weights.Embedding), and warm_up loads every kernel the types use."""
    from dsd.shard.weights import Embedding, Linear

    rng = np.random.default_rng(1300)
    for gt in IQ:
        bs = GGML_QUANT_SIZES[gt][0]
        table = random_raw(gt, 50, 2 * bs, rng)
        ids = np.array([7, 0, 49, 7])
        got = Embedding(Linear(table, int(gt), 2 * bs))(ids)
        assert_bits_equal(got, reference(table, gt, 2 * bs)[ids])
    assert registry.warm_up([int(t) for t in IQ]) >= 0


def test_registry_knows_the_types():
    """Block geometry for the planners and weight loaders (quant_type / row_bytes /
    has_simd_rows), and a clear refusal of a row that is not whole blocks."""
    for gt in IQ:
        bs, ts = GGML_QUANT_SIZES[gt]
        qt = kernels.quant_type(int(gt))
        assert (qt.name, qt.block_size, qt.type_size) == (gt.name, bs, ts)
        assert kernels.row_bytes(int(gt), 4 * bs) == 4 * ts and kernels.has_simd_rows(int(gt), 4 * bs)
        with pytest.raises(DsdError, match="block size"):
            kernels.row_bytes(int(gt), bs + 32 if bs == 256 else 48)


def test_row_products_identical_serial_parallel_and_gathered(monkeypatch):
    """A row's product is one fixed sum (simd_iq.dot32): the same bits from the serial and the
    parallel kernel, from matvec, matvec_gather and the batch-invariant matmul, so the mode's
    promise holds whichever of them the matrix size picks."""
    rng = np.random.default_rng(1400)
    for gt in (G.IQ1_S, G.IQ3_S, G.IQ4_XS, G.TQ2_0):
        bs = GGML_QUANT_SIZES[gt][0]
        stack = np.stack([random_raw(gt, 48, 4 * 256, rng) for _ in range(2)])
        X = rng.standard_normal((5, 4 * 256)).astype(np.float32)
        got = []
        for par in (1 << 62, 0):
            monkeypatch.setattr(registry, "PAR_MIN_BYTES", par)
            got.append(np.stack([kernels.matvec(stack[1], int(gt), x) for x in X]))
            got.append(kernels.matvec_gather(stack, int(gt), [1] * 5, X))
            with registry.batch_invariant():
                got.append(kernels.matmul(stack[1], int(gt), X))
        for g in got[1:]:
            np.testing.assert_array_equal(g, got[0])
        assert bs in (32, 256)
