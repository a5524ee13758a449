"""Fused decode-path kernels (RMSNorm, RoPE) against their numpy definitions."""
import numpy as np
import pytest

from dsd.shard import ops


def test_rms_norm_fused_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 576)).astype(np.float32) * 3
    w = rng.standard_normal(576).astype(np.float32)
    got = ops.rms_norm(x, w, 1e-5)
    ref = ops.rms_norm_numpy(x, w, 1e-5)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope_fused_equals_numpy(style, n_rot):
    rng = np.random.default_rng(1)
    table = ops.RopeTable(n_rot, 10000.0, style, max_pos=16)
    x = rng.standard_normal((7, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 2, 40, 41, 5, 300])  # past max_pos: the table grows
    got = table.apply(x, pos)
    ref = table.apply_numpy(x, pos)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[..., n_rot:], x[..., n_rot:])
    # rotation preserves each pair's norm
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
