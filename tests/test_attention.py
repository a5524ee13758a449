"""Decode attention kernel (shard/kernels/attention.py) against a float64 reference written from
the definition softmax(q k^T * scale) v, and against ops.attention's numpy (matmul) path."""
import numpy as np
import pytest

from dsd.shard import ops
from dsd.shard.kernels import attention as A


def ref_decode(q, k, v, scale):
    """float64: q [H, Dk], k [Hkv, L, Dk], v [Hkv, L, Dv] -> [H, Dv]; head h uses kv h // g."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    H, Hkv = q.shape[0], k.shape[0]
    g = H // Hkv
    out = np.empty((H, v.shape[2]))
    for h in range(H):
        s = k[h // g] @ q[h] * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // g]
    return out


def cache_views(rng, Hkv, L, Dk, Dv, cap):
    """k, v as SequenceCache hands them out: [Hkv, L, D] views of [Hkv, cap, D] buffers."""
    kb = rng.standard_normal((Hkv, cap, Dk), dtype=np.float32)
    vb = rng.standard_normal((Hkv, cap, Dv), dtype=np.float32)
    return kb[:, :L], vb[:, :L]


@pytest.mark.parametrize("g", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 2, 15, 16, 17, 63, 64, 65, 129, 600, 2000])
def test_decode_matches_float64(g, D, L):
    rng = np.random.default_rng(L * 31 + g * 7 + D)
    Hkv = 2
    k, v = cache_views(rng, Hkv, L, D, D, cap=L + 37)  # head stride != L * D
    assert not k.flags.c_contiguous or L + 37 == L
    q = rng.standard_normal((Hkv * g, D), dtype=np.float32) * 2.0
    scale = 1.0 / np.sqrt(D)
    assert A.supported(q, k, v)
    got = A.decode(q, k, v, scale)
    want = ref_decode(q, k, v, scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # and through ops.attention (n == 1 takes the kernel)
    np.testing.assert_allclose(ops.attention(q[None], k, v, L - 1, scale)[0], want, rtol=0, atol=2e-5)


def test_peaked_and_flat_softmax():
    """Large score range (exp clamp, underflow to 0) and all-equal scores."""
    rng = np.random.default_rng(1)
    Hkv, g, D, L = 3, 3, 64, 300
    k, v = cache_views(rng, Hkv, L, D, D, cap=512)
    q = rng.standard_normal((Hkv * g, D), dtype=np.float32) * 30.0  # scores spread over ~1000
    got = A.decode(q, k, v, 0.125)
    np.testing.assert_allclose(got, ref_decode(q, k, v, 0.125), rtol=0, atol=1e-4)
    q0 = np.zeros_like(q)  # uniform weights: mean of V
    np.testing.assert_allclose(A.decode(q0, k, v, 0.125), np.repeat(v.mean(axis=1), g, axis=0), atol=1e-5)


def test_matches_numpy_path():
    """Decode kernel == the prompt path (kernels/attention_prefill.py, reached with n = 2 queries;
    its last row sees all L)."""
    rng = np.random.default_rng(2)
    Hkv, g, D, L = 3, 3, 64, 611
    k, v = cache_views(rng, Hkv, L, D, D, cap=1024)
    q2 = rng.standard_normal((2, Hkv * g, D), dtype=np.float32)
    numpy_path = ops.attention(q2, k, v, L - 2, 0.125)[1]
    kernel = ops.attention(q2[1:], k, v, L - 1, 0.125)[0]
    np.testing.assert_allclose(kernel, numpy_path, rtol=0, atol=1e-5)


@pytest.mark.parametrize("L", [1, 40, 700])
def test_deepseek_mla_views(L):
    """DeepSeek MLA: k [1, L, 576] and v [1, L, 512] are views of one latent array, g = 16."""
    rng = np.random.default_rng(L)
    lat = rng.standard_normal((L + 5, 576), dtype=np.float32) * 0.3
    k, v = lat[None, :L], lat[None, :L, :512]
    q = rng.standard_normal((16, 576), dtype=np.float32)
    assert A.supported(q, k, v)
    got = ops.attention(q[None], k, v, L - 1, 0.07)[0]
    np.testing.assert_allclose(got, ref_decode(q, k, v, 0.07), rtol=0, atol=2e-5)


def test_unsupported_shapes_fall_back():
    """Head dim not a multiple of 16 (and float64 inputs): numpy path, still correct."""
    rng = np.random.default_rng(3)
    k, v = cache_views(rng, 2, 50, 40, 40, cap=64)
    q = rng.standard_normal((4, 40), dtype=np.float32)
    assert not A.supported(q, k, v)
    np.testing.assert_allclose(ops.attention(q[None], k, v, 49, 0.2)[0], ref_decode(q, k, v, 0.2), atol=2e-5)
    assert not A.supported(q.astype(np.float64), k, v)


@pytest.mark.parametrize("g,D,L", [(3, 64, 1), (3, 64, 600), (4, 128, 77), (1, 64, 2000)])
def test_float16_cache(g, D, L):
    """float16 K/V (SequenceCache(kv_dtype=np.float16)): kernel == float64 math on the fp16 values, and ==
    the numpy path (which converts to float32)."""
    rng = np.random.default_rng(g + L)
    k, v = cache_views(rng, 2, L, D, D, cap=L + 9)
    k, v = k.astype(np.float16), v.astype(np.float16)
    q = rng.standard_normal((2 * g, D), dtype=np.float32)
    assert A.supported(q, k, v)
    want = ref_decode(q, k, v, 0.1)
    np.testing.assert_allclose(A.decode(q, k, v, 0.1), want, rtol=0, atol=2e-5)
    if L > 1:
        q2 = np.concatenate([q[None], q[None]])
        np.testing.assert_allclose(ops.attention(q2, k, v, L - 2, 0.1)[1], want, rtol=0, atol=2e-5)


def test_sequence_cache_dtype_and_views():
    """heads_first buffers are float32 by default, float16 on request, and round-trip rows."""
    from dsd.shard.kv_cache import SequenceCache
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, 3, 64), dtype=np.float32)
    for dt in (np.float16, np.float32):
        c = SequenceCache(1, 1000, initial=8, kv_dtype=dt)
        c.append(0, 0, heads_first=True, k=rows[:5])
        kv = c.append(0, 5, heads_first=True, k=rows[5:])  # grows the buffer (copy path)
        assert kv["k"].dtype == dt and kv["k"].shape == (3, 300, 64)
        np.testing.assert_array_equal(kv["k"], rows.astype(dt).swapaxes(0, 1))
    assert SequenceCache(1, 10).append(0, 0, heads_first=True, x=rows[:2])["x"].dtype == np.float32
    assert SequenceCache(1, 10, kv_dtype=np.float16).append(0, 0, x=rows[:2])["x"].dtype == np.float32


@pytest.mark.parametrize("Hkv,g,L", [(3, 3, 700), (1, 16, 513), (4, 2, 300), (2, 1, 129)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_split_over_positions_matches_serial(Hkv, g, L, dtype):
    """The flash-decoding split (partial softmax sums combined by log-sum-exp) equals the one-pass
    kernel to float rounding, for every split count, and the float64 reference."""
    from dsd.shard.kernels import attention as ak

    rng = np.random.default_rng(L)
    Dk, Dv = 64, 48
    q = rng.standard_normal((Hkv * g, Dk)).astype(np.float32)
    k = rng.standard_normal((Hkv, L, Dk)).astype(dtype)
    v = rng.standard_normal((Hkv, L, Dv)).astype(dtype)
    kk, vv = (a.view(np.uint16) if dtype == np.float16 else a for a in (k, v))
    ref = np.empty((Hkv * g, Dv), np.float32)
    ak.decode_serial(q, kk, vv, np.float32(0.125), ref)
    s = np.einsum("jgd,jld->jgl", q.reshape(Hkv, g, Dk).astype(np.float64), k.astype(np.float64)) * 0.125
    p = np.exp(s - s.max(axis=2, keepdims=True))
    exact = (np.einsum("jgl,jld->jgd", p, v.astype(np.float64)) / p.sum(axis=2)[..., None]).reshape(Hkv * g, Dv)
    np.testing.assert_allclose(ref, exact, atol=1e-4)
    for nsplit in (1, 2, 3, 7):
        out = np.empty_like(ref)
        ak.decode_split(q, kk, vv, np.float32(0.125), out, nsplit)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_split_count_balances_items_over_threads():
    from dsd.shard.kernels.attention import SPLIT_MIN_POSITIONS, n_splits

    assert n_splits(3, 4096, 1) == 0             # one thread: the serial kernel
    assert n_splits(3, 60, 2) == 0               # too few positions to be worth a parallel region
    for threads in range(2, 65):
        for Hkv in (1, 2, 3, 8, 16):
            ns = n_splits(Hkv, 8192, threads)
            assert ns >= 1 and Hkv * ns >= 2 * threads or 8192 // ns < 2 * SPLIT_MIN_POSITIONS
            assert 8192 // ns >= SPLIT_MIN_POSITIONS
