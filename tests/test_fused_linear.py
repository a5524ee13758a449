"""weights.FusedLinear: several matrices that multiply the same x in one kernel call must give
exactly what separate calls give (same row kernels, same quantized x), and fall back to separate
calls when the matrices do not share a buffer, a type or a column count."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from dsd.shard import kernels
from dsd.shard.synth import random_blocks
from dsd.shard.weights import FusedLinear, Linear, ReadCounter


def _parts_in_one_buffer(gt, rows, cols, rng, gap_rows=3):
    """Matrices carved from one uint8 buffer (as in a GGUF mmap), with gaps between them."""
    rb = kernels.row_bytes(int(gt), cols)
    total = sum(rows) + gap_rows * len(rows)
    buf = random_blocks(int(gt), (total, cols), rng)
    parts, r = [], 0
    for n in rows:
        parts.append(Linear(buf[r:r + n], int(gt), cols, f"m{len(parts)}"))
        r += n + gap_rows
    assert parts[0].raw.shape[1] == rb
    return parts


@pytest.mark.parametrize("gt", [G.Q4_K, G.Q6_K, G.Q8_0, G.Q4_1, G.Q4_0, G.F16])
@pytest.mark.parametrize("rows", [(96, 32, 32), (64, 48), (40, 40, 40, 8)])
def test_fused_matches_separate_calls_bit_for_bit(gt, rows):
    rng = np.random.default_rng(int(gt) * 100 + len(rows))
    cols = 512
    parts = _parts_in_one_buffer(gt, rows, cols, rng)
    fused = FusedLinear(parts)
    assert fused.fused
    x = rng.standard_normal((1, cols)).astype(np.float32)
    ReadCounter.reset()
    got = fused(x)
    assert ReadCounter.reset() == sum(p.nbytes for p in parts)
    for p, g in zip(parts, got):
        assert g.shape == (1, p.rows)
        np.testing.assert_array_equal(g, p(x))
    # prompts (T > 1) take the separate path
    X = rng.standard_normal((5, cols)).astype(np.float32)
    for p, g in zip(parts, fused(X)):
        np.testing.assert_array_equal(g, p(X))


def test_fused_result_is_the_dequantized_product():
    rng = np.random.default_rng(7)
    parts = _parts_in_one_buffer(G.Q4_K, (64, 128), 256, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    with kernels.exact_activations():
        got = FusedLinear(parts)(x)
    for p, g in zip(parts, got):
        ref = p.dequantize().astype(np.float64) @ x[0].astype(np.float64)
        np.testing.assert_allclose(g[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_falls_back_when_matrices_do_not_share_a_buffer_or_type():
    rng = np.random.default_rng(3)
    a = Linear(random_blocks(int(G.Q4_K), (32, 256), rng), int(G.Q4_K), 256)
    b = Linear(random_blocks(int(G.Q4_K), (32, 256), rng), int(G.Q4_K), 256)
    c = Linear(random_blocks(int(G.Q8_0), (32, 256), rng), int(G.Q8_0), 256)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    for parts in ([a, b], [a, c]):
        f = FusedLinear(parts)
        assert not f.fused
        for p, g in zip(parts, f(x)):
            np.testing.assert_array_equal(g, p(x))
