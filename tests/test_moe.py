"""RoutedExperts and Router: partitions of experts x rows sum to the full result, byte counting,
routing semantics against a direct float64 implementation, and every expert quant type."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from dsd.shard.kernels import exact_activations, registry
from dsd.shard.moe import (GATING_SIGMOID, GATING_SOFTMAX, RoutedExperts, Router, aligned_row_ranges,
                           moe_bytes_read, reset_moe_stats)
from dsd.shard.synth import random_blocks
from dsd.shard.weights import ExpertStack, Linear
from tests.reference.moe_ref import route

E, F, D, T, K = 8, 512, 256, 7, 3


def stack(a, qtype, ids=None):
    """ExpertStack of `a` in qtype (K-quants, which gguf-py cannot quantize: random blocks)."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raw = random_blocks(qtype, a.shape, np.random.default_rng(int(a.sum() * 1000) % 2**31), std=float(a.std()))
    elif qtype == Q.F32:
        raw = a.view(np.uint8).reshape(*a.shape[:-1], -1)
    else:
        raw = quantize(a, qtype).view(np.uint8).reshape(*a.shape[:-1], -1)
    return ExpertStack(np.ascontiguousarray(raw), qtype, a.shape[-1], "t", expert_ids=ids), raw


def make(qtype, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((E, F, D)).astype(np.float32) / 16
    u = rng.standard_normal((E, F, D)).astype(np.float32) / 16
    d = rng.standard_normal((E, D, F)).astype(np.float32) / 22
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int64)
    w = rng.random((T, K)).astype(np.float32)
    return g, u, d, x, ids, w


def reference(stacks, x, ids, w):
    """float64 sum_j w * down(silu(gate x) * up x) from gguf-py-dequantized weights."""
    g, u, d = [dequantize(raw, qt).astype(np.float64).reshape(shape) for raw, qt, shape in stacks]
    out = np.zeros((T, D))
    for t in range(T):
        for j in range(K):
            e = ids[t, j]
            a = g[e] @ x[t]
            out[t] += w[t, j] * (d[e] @ (a / (1 + np.exp(-a)) * (u[e] @ x[t])))
    return out


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_full_and_partition_equal_reference(qtype):
    g, u, d, x, ids, w = make(qtype)
    (gs, gr), (us, ur), (ds, dr) = stack(g, qtype), stack(u, qtype), stack(d, qtype)
    full = RoutedExperts(gs, us, ds)
    ref = reference([(gr, qtype, g.shape), (ur, qtype, u.shape), (dr, qtype, d.shape)], x, ids, w)
    with exact_activations():  # float32 activations: float32 rounding only
        exact = full(x, ids, w)
    assert np.abs(exact - ref).max() / np.abs(ref).max() < 1e-4
    # the default path: Q4_K, Q5_K, Q6_K (and Q8_0 with VNNI) products quantize their input to 8 bits on VNNI CPUs (llama.cpp's
    # scheme; each product is within its rounding bound, tests/test_kernels.py). Through gate, up
    # and down of random experts (sum |w x| >> |sum w x|) that is a few % of the largest output,
    # where a wrong expert, row or scale would be O(1).
    y = full(x, ids, w)
    int8 = registry.INT8_ACTIVATIONS and int(qtype) in registry._I8_KINDS  # Q8_0 too, with VNNI
    assert np.abs(y - ref).max() / np.abs(ref).max() < (6e-2 if int8 else 1e-4)
    # partition: 3 expert subsets x 2 row ranges (256 = a block boundary for every type)
    subsets = [[0, 3, 5], [1, 2], [4, 6, 7]]
    total = np.zeros_like(y)
    for sub in subsets:
        for rows in [(0, 256), (256, F)]:
            part = RoutedExperts(gs, us, ds, experts=sub, rows=rows)
            total += part(x, ids, w)
    assert np.abs(total - y).max() / np.abs(y).max() < 1e-5


def test_worker_stack_with_expert_ids_and_bytes_read():
    g, u, d, x, ids, w = make(Q.Q8_0, seed=1)
    (gs, _), (us, _), (ds, _) = stack(g, Q.Q8_0), stack(u, Q.Q8_0), stack(d, Q.Q8_0)
    full = RoutedExperts(gs, us, ds)
    y = full(x, ids, w)
    used = set(ids.ravel().tolist())
    per_expert = (2 * F * (D // 32 * 34)) + D * (F // 32 * 34)
    assert full.bytes_read == len(used) * per_expert   # each chosen expert read once per call
    assert full.expert_evals == len(used)
    # a worker holding only experts {2, 5, 6} as its own (copied) stack, half the rows
    mine = [2, 5, 6]
    sub = lambda s: ExpertStack(np.ascontiguousarray(s.raw[mine]), s.ggml_type, s.cols, expert_ids=mine)  # noqa: E731
    parts = [RoutedExperts(sub(gs), sub(us), sub(ds), rows=r) for r in [(0, 128), (128, F)]]
    rest = RoutedExperts(gs, us, ds, experts=[e for e in range(E) if e not in mine])
    total = rest(x, ids, w) + sum(p(x, ids, w) for p in parts)
    assert np.abs(total - y).max() / np.abs(y).max() < 1e-5
    n_mine = len(used & set(mine))
    assert sum(p.bytes_read for p in parts) == n_mine * per_expert
    assert rest.bytes_read == (len(used) - n_mine) * per_expert
    full.reset_stats()
    assert full.bytes_read == 0
    with pytest.raises(ValueError):
        RoutedExperts(sub(gs), sub(us), sub(ds), experts=[0])
    with pytest.raises(ValueError):  # down's columns must split on a Q8_0 block boundary
        RoutedExperts(gs, us, ds, rows=(0, 100))
    ranges = aligned_row_ranges(ds, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == F and all(a % 32 == 0 for r in ranges for a in r)
    tri = sum(RoutedExperts(gs, us, ds, rows=r)(x, ids, w) for r in ranges)
    assert np.abs(tri - y).max() / np.abs(y).max() < 1e-5


def test_decode_single_token_path_matches_batch():
    g, u, d, x, ids, w = make(Q.Q8_0, seed=2)
    ex = RoutedExperts(*(stack(a, Q.Q8_0)[0] for a in (g, u, d)))
    batch = ex(x, ids, w)
    rows = np.concatenate([ex(x[t:t + 1], ids[t:t + 1], w[t:t + 1]) for t in range(T)])
    assert np.abs(rows - batch).max() / np.abs(batch).max() < 1e-5


@pytest.mark.parametrize("gating,norm,scale,groups,used,bias", [
    (GATING_SOFTMAX, True, 0.0, 1, 0, False),     # Mixtral / Qwen3-MoE
    (GATING_SOFTMAX, False, 16.0, 1, 0, False),   # DeepSeek V2-Lite
    (GATING_SOFTMAX, False, 16.0, 8, 3, False),   # DeepSeek V2 (group max)
    (GATING_SIGMOID, True, 2.5, 4, 2, True),      # DeepSeek V3 / R1
    (GATING_SIGMOID, True, 2.5, 8, 3, True),
])
def test_router_matches_direct_implementation(gating, norm, scale, groups, used, bias):
    rng = np.random.default_rng(3)
    n_exp, k, Tn = 32, 6, 40
    Wg = rng.standard_normal((n_exp, D)).astype(np.float32) / 4
    b = (0.3 * rng.standard_normal(n_exp)).astype(np.float32) if bias else None
    x = rng.standard_normal((Tn, D)).astype(np.float32)
    r = Router(Linear(Wg.view(np.uint8).reshape(n_exp, -1), Q.F32, D), k, gating, norm, scale, b, groups, used)
    ids, w = r(x)
    assert ids.shape == (Tn, k) and w.dtype == np.float32
    W = {"ffn_gate_inp.weight": Wg.astype(np.float64)}
    ref = route(x.astype(np.float64), W, "", k, sigmoid=gating == GATING_SIGMOID, bias=b, norm=norm,
                scale=scale, groups=groups, groups_used=used)
    for t in range(Tn):
        assert ids[t].tolist() == [e for e, _ in ref[t]]
        assert np.allclose(w[t], [v for _, v in ref[t]], rtol=1e-5)
    if groups > 1:  # every token's experts lie in at most `used` groups
        assert all(len(set((ids[t] // (n_exp // groups)).tolist())) <= used for t in range(Tn))


def test_moe_bytes_read_walks_model():
    class M:
        pass
    g, u, d, x, ids, w = make(Q.Q8_0)
    ex = RoutedExperts(*(stack(a, Q.Q8_0)[0] for a in (g, u, d)))
    m = M()
    m.ffn = [object(), type("F", (), {"experts": ex})()]
    ex(x, ids, w)
    assert moe_bytes_read(m) == ex.bytes_read > 0
    reset_moe_stats(m)
    assert moe_bytes_read(m) == 0
