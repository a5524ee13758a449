"""One-token (decode) fast paths of Router, RoutedExperts and DeepSeek2's embedding give the same
results as the general batched paths / the kernel dequantizer (bit-identical or to rounding)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from dsd.shard.moe import GATING_SIGMOID, GATING_SOFTMAX, RoutedExperts, Router
from dsd.shard.synth import random_blocks
from dsd.shard.weights import Embedding, ExpertStack, Linear

E, F, D, K = 8, 256, 256, 3


@pytest.mark.parametrize("gating,norm,scale", [(GATING_SOFTMAX, False, 0.0), (GATING_SOFTMAX, True, 0.0),
                                               (GATING_SIGMOID, True, 2.5)])
def test_router_single_token_matches_batched(gating, norm, scale):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((E, D)).astype(np.float32)
    r = Router(Linear(W.view(np.uint8).reshape(E, -1), Q.F32, D), K, gating, norm, scale)
    for _ in range(20):
        x = rng.standard_normal((2, D)).astype(np.float32)
        ids1, w1 = r(x[:1])           # fast path (T == 1)
        idsb, wb = r(x)               # general path (T == 2), row 0 is the same token
        assert ids1.shape == (1, K) and ids1.dtype == np.int64 and w1.dtype == np.float32
        np.testing.assert_array_equal(ids1[0], idsb[0])
        np.testing.assert_allclose(w1[0], wb[0], rtol=1e-6)


def test_router_single_token_ties_pick_lowest_index():
    W = np.zeros((E, D), dtype=np.float32)  # all logits equal: a stable choice is experts 0..K-1
    r = Router(Linear(W.view(np.uint8).reshape(E, -1), Q.F32, D), K)
    ids, w = r(np.ones((1, D), dtype=np.float32))
    np.testing.assert_array_equal(ids[0], np.arange(K))
    np.testing.assert_allclose(w[0], 1.0 / E)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K])
def test_routed_experts_single_token_matches_batched(qtype):
    rng = np.random.default_rng(2)
    st = [ExpertStack(random_blocks(qtype, (E, F, D), rng, std=0.05), qtype, D, "g"),
          ExpertStack(random_blocks(qtype, (E, F, D), rng, std=0.05), qtype, D, "u"),
          ExpertStack(random_blocks(qtype, (E, D, F), rng, std=0.05), qtype, F, "d")]
    x = rng.standard_normal((2, D)).astype(np.float32)
    ids = np.array([[5, 1, 6], [5, 1, 6]])
    w = rng.random((2, K)).astype(np.float32)
    full = RoutedExperts(*st)
    y1 = full(x[:1], ids[:1], w[:1])
    yb = full(x, ids, w)
    assert y1.shape == (1, D)
    np.testing.assert_allclose(y1[0], yb[0], rtol=1e-5, atol=1e-5 * np.abs(yb).max())
    assert full.bytes_read > 0 and full.expert_evals == 2 * K
    # a worker holding only some experts: the partial sums still add up to the whole
    a, b = RoutedExperts(*st, experts=[1]), RoutedExperts(*st, experts=[0, 2, 3, 4, 5, 6, 7])
    np.testing.assert_allclose(a(x[:1], ids[:1], w[:1]) + b(x[:1], ids[:1], w[:1]), y1,
                               rtol=1e-5, atol=1e-5 * np.abs(y1).max())
    none = RoutedExperts(*st, experts=[0])
    np.testing.assert_array_equal(none(x[:1], ids[:1], w[:1]), np.zeros((1, D), np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K, Q.F16])
def test_embedding_lookup_is_bit_identical_to_gguf_py(qtype):
    """Few-row lookups (decode) run serially, many rows in parallel; both equal gguf-py."""
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, (40, 512), rng, std=0.5)
    lin = Linear(raw, qtype, 512)
    emb = Embedding(lin)
    for ids in ([7], [0, 39], [3, 3, 9, 1], list(range(12)), list(range(40)) * 8):
        got = emb(np.array(ids))
        assert got.shape == (len(ids), 512) and got.dtype == np.float32
        np.testing.assert_array_equal(got, dequantize(raw[ids], qtype).reshape(len(ids), 512))
