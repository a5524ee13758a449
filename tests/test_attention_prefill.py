"""The fused prompt attention kernel (shard/kernels/attention_prefill.py) against float64 math:
every cache type as stored (f32, f16, bf16 and q8_0 rows read in place, compared with the
dequantized cache), GQA and DeepSeek's MLA (one latent head, V a prefix of K), a chunk after a
long history (a prefix-cache hit), chunks of more than one work item, and the model path
(ops.attention / causal_attention) choosing it for prompt chunks."""
from __future__ import annotations

import numpy as np
import pytest

from dsd.shard import ops
from dsd.shard.kernels import attention as A
from dsd.shard.kernels.attention_prefill import prefill, prefill_supported, tokens_per_item
from dsd.shard.kv_cache import KVRows, decode, encode


def ref_causal(q, k, v, q_pos0, scale):
    """float64: query t (position q_pos0 + t), head h sees keys 0 .. q_pos0 + t of kv head h // g."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, H, _ = q.shape
    g = H // k.shape[0]
    out = np.empty((n, H, v.shape[2]))
    for t in range(n):
        L = q_pos0 + t + 1
        for h in range(H):
            s = k[h // g, :L] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[h // g, :L]
    return out


def stored(kv_type, x):
    """x [Hkv, L, D] float32 -> (the cache's view as the model passes it, its float32 values)."""
    if kv_type == "f32":
        return x, x
    if kv_type == "f16":
        y = x.astype(np.float16)
        return y, y.astype(np.float32)
    raw = encode(kv_type, x.reshape(-1, x.shape[-1])).reshape(x.shape[:2] + (-1,))
    return KVRows(raw, kv_type), decode(kv_type, raw.reshape(-1, raw.shape[-1])).reshape(x.shape)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("n,Hkv,g,D,q_pos0", [(5, 3, 3, 64, 0), (27, 3, 3, 64, 700), (40, 2, 1, 32, 9),
                                               (3, 1, 16, 64, 130)])
def test_gqa_matches_float64(kv_type, n, Hkv, g, D, q_pos0):
    rng = np.random.default_rng(n + D)
    L = q_pos0 + n
    q = rng.standard_normal((n, Hkv * g, D), dtype=np.float32)
    k, kf = stored(kv_type, rng.standard_normal((Hkv, L, D), dtype=np.float32))
    v, vf = stored(kv_type, rng.standard_normal((Hkv, L, D), dtype=np.float32))
    assert prefill_supported(q, k, v, q_pos0)
    out = prefill(q, k, v, q_pos0, 0.125)
    np.testing.assert_allclose(out, ref_causal(q, kf, vf, q_pos0, 0.125), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_mla_latent_views(kv_type):
    """DeepSeek MLA: k = the cached rows [c ; k_pe] (576 wide), v = their first 512 values."""
    rng = np.random.default_rng(3)
    n, H, q_pos0 = 9, 16, 200
    lat, latf = stored(kv_type, rng.standard_normal((1, q_pos0 + n, 576), dtype=np.float32) * 0.3)
    q = rng.standard_normal((n, H, 576), dtype=np.float32) * 0.3
    out = prefill(q, lat, lat[:, :, :512], q_pos0, 0.07)
    np.testing.assert_allclose(out, ref_causal(q, latf, latf[:, :, :512], q_pos0, 0.07), rtol=0, atol=1e-5)


def test_model_path_uses_it_for_prompt_chunks(monkeypatch):
    """ops.attention (f32 / f16 caches) and causal_attention (bf16 / q8_0) route a prompt chunk
    to the kernel; sinks / windows (gpt-oss) keep the numpy path, which agrees with it."""
    import dsd.shard.kernels.attention_prefill as P

    calls = []
    real = P.prefill_kernel
    monkeypatch.setattr(P, "prefill_kernel", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(4)
    q = rng.standard_normal((6, 4, 32), dtype=np.float32)
    kf = rng.standard_normal((2, 50, 32), dtype=np.float32)
    vf = rng.standard_normal((2, 50, 32), dtype=np.float32)
    a = ops.attention(q, kf.astype(np.float16), vf.astype(np.float16), 44, 0.2)
    kq, kqf = stored("q8_0", kf)
    vq, vqf = stored("q8_0", vf)
    b = A.causal_attention(q, kq, vq, 44, 0.2)
    assert len(calls) == 2
    numpy_path = A.causal_attention(q, kqf, vqf, 44, 0.2, window=1000)   # window: the numpy path
    assert len(calls) == 2
    np.testing.assert_allclose(b, numpy_path, rtol=0, atol=2e-6)
    np.testing.assert_allclose(a, ref_causal(q, kf.astype(np.float16), vf.astype(np.float16), 44, 0.2),
                               rtol=0, atol=2e-6)


def test_work_items_bound_the_score_rows():
    assert tokens_per_item(1) == 16 and tokens_per_item(3) == 16 and tokens_per_item(16) == 4
    assert tokens_per_item(128) == 1


def test_unsupported_shapes_are_refused():
    q = np.zeros((4, 2, 24), np.float32)          # head dim not a multiple of 16
    k = np.zeros((2, 10, 24), np.float32)
    assert not prefill_supported(q, k, k, 6)
    q = np.zeros((4, 2, 32), np.float32)
    k = np.zeros((2, 12, 32), np.float32)
    assert not prefill_supported(q, k, k, 6)      # keys are not exactly q_pos0 + n positions
    assert prefill_supported(q, k[:, :10], k[:, :10], 6)
