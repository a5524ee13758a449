"""Batch invariance (registry.batch_invariant / DSD_DETERMINISTIC=1): a token's product row is
bit-identical whether it is computed alone (matvec), in a small batch, in a prompt-sized batch, or
through the gathered expert path -- for every weight type, serial and parallel, with the 8-bit
activation path where this CPU has it and with float activations.

Without the mode only the K-quants' 8-bit kernels promise this (their multi-token kernel runs the
one-token kernel's arithmetic per token); the float kernels share a decoded row across tokens
(mm_fused) or hand the product to sgemm, whose blocking depends on T."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from dsd.shard.kernels import matmul, matvec, matvec_gather, registry
from dsd.shard.kernels import batch_invariant, exact_activations

from .test_kernels import ALL, random_raw

TOKEN_COUNTS = (2, 3, 8, 16, 17, 40)  # decode batches, the fused-kernel limit, prompt chunks


def _cols(gt):
    return 512 if gt in (G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K) else 320  # 320: a Q8_0 pair tail


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float-x"])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_token_row_same_alone_batched_and_gathered(gt, int8, parallel, monkeypatch):
    if int8 and not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: no 8-bit activation path to check (float-x runs)")
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 7 + int8)
    n = _cols(gt)
    stack = np.stack([random_raw(gt, 40, n, rng, True) for _ in range(2)])
    X = rng.standard_normal((max(TOKEN_COUNTS), n)).astype(np.float32)
    X[3] *= 40  # one token with large activations (its own 8-bit scales)
    ctx = batch_invariant() if int8 else _both(batch_invariant(), exact_activations())
    with ctx:
        alone = np.stack([matvec(stack[1], int(gt), X[t]) for t in range(X.shape[0])])
        for T in TOKEN_COUNTS:
            got = matmul(stack[1], int(gt), X[:T])
            bad = np.flatnonzero(np.any(got != alone[:T], axis=1))
            assert bad.size == 0, f"T={T}: tokens {bad} differ from matvec (max {np.abs(got - alone[:T]).max()})"
        ids, xi = [1, 0, 1, 1], [0, 5, 3, 7]
        got = matvec_gather(stack, int(gt), ids, X, xi)
        for i, (e, t) in enumerate(zip(ids, xi)):
            want = alone[t] if e == 1 else matvec(stack[0], int(gt), X[t])
            assert np.array_equal(got[i], want), (i, e, t)


class _both:
    def __init__(self, *ctxs):
        self.ctxs = ctxs

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def test_default_mode_k_quant_int8_kernels_are_invariant():
    """The K-quants' 8-bit path holds the property without the mode (decode batches of any size
    compute each token as matvec does)."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: K-quants run the float kernels")
    rng = np.random.default_rng(3)
    for gt in (G.Q4_K, G.Q5_K, G.Q6_K):
        raw = random_raw(gt, 64, 512, rng, False)
        X = rng.standard_normal((24, 512)).astype(np.float32)
        alone = np.stack([matvec(raw, int(gt), x) for x in X])
        for T in (2, 9, 24):
            assert np.array_equal(matmul(raw, int(gt), X[:T]), alone[:T]), (gt.name, T)


def test_mode_is_off_by_default_and_scoped():
    assert registry.BATCH_INVARIANT is False or registry.BATCH_INVARIANT is True
    before = registry.BATCH_INVARIANT
    with batch_invariant():
        assert registry.BATCH_INVARIANT is True
        with batch_invariant(False):
            assert registry.BATCH_INVARIANT is False
        assert registry.BATCH_INVARIANT is True
    assert registry.BATCH_INVARIANT is before
