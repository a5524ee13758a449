"""weights.FusedExperts (kernels/experts.py): a decode step's routed experts in two fused kernel
calls must equal the three gathered products (same row kernels: gate, up and down values are
bit-identical; SiLU and the expert sum may differ by float rounding) and the float64 reference,
for whole stacks, expert subsets and row shares."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize

from dsd.shard import kernels, moe
from dsd.shard.synth import random_blocks
from dsd.shard.weights import ExpertStack


def _stacks(gt_gu, gt_down, E=8, F=512, D=256, seed=0):
    """gate and up carved from ONE buffer (as in a GGUF file), down separate."""
    rng = np.random.default_rng(seed)
    gu = random_blocks(int(gt_gu), (2 * E * F, D), rng).reshape(2, E, F, -1)
    down = random_blocks(int(gt_down), (E * D, F), rng).reshape(E, D, -1)
    return (ExpertStack(gu[0], int(gt_gu), D, "gate"), ExpertStack(gu[1], int(gt_gu), D, "up"),
            ExpertStack(down, int(gt_down), F, "down"))


def _reference(stacks, x, ids, w, rows=None):
    g, u, d = (dequantize(st.raw, st.ggml_type).astype(np.float64) for st in stacks)
    r0, r1 = rows or (0, g.shape[1])
    out = np.zeros((x.shape[0], d.shape[1]))
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t], w[t]):
            a = g[e, r0:r1] @ x[t]
            b = u[e, r0:r1] @ x[t]
            out[t] += wt * (d[e][:, r0:r1] @ (a / (1 + np.exp(-a)) * b))
    return out


def _run(re, x, ids, w, fused: bool):
    saved = moe.FUSED_MOE
    moe.FUSED_MOE = fused
    try:
        re._fused = None
        return re(x, ids, w)
    finally:
        moe.FUSED_MOE = saved


@pytest.mark.parametrize("gt_gu,gt_down", [(G.Q4_K, G.Q8_0), (G.Q6_K, G.Q6_K), (G.Q8_0, G.Q8_0),
                                           (G.Q4_0, G.Q4_K)])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("share", ["all", "subset", "rows"])
def test_fused_matches_gathered_and_reference(gt_gu, gt_down, T, share):
    stacks = _stacks(gt_gu, gt_down, seed=T)
    rng = np.random.default_rng(T + 1)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    ids = np.stack([rng.choice(8, 3, replace=False) for _ in range(T)])
    w = rng.random((T, 3)).astype(np.float32)
    kw = {"all": {}, "subset": {"experts": [1, 2, 5, 6]}, "rows": {"rows": (256, 512)}}[share]
    re = moe.RoutedExperts(*stacks, **kw)
    fused = _run(re, x, ids, w, True)
    assert re._fused is not None and re._fused.ok
    gathered = _run(re, x, ids, w, False)
    scale = np.abs(gathered).max()
    np.testing.assert_allclose(fused, gathered, rtol=0, atol=2e-5 * scale)
    if share == "subset":  # only the owned experts contribute
        ids_ref = [[e for e in row if e in kw["experts"]] for row in ids]
        w_ref = [[wt for e, wt in zip(row, wr) if e in kw["experts"]] for row, wr in zip(ids, w)]
    else:
        ids_ref, w_ref = ids, w
    with kernels.exact_activations():
        exact = _run(re, x, ids, w, True)
    ref = _reference(stacks, x.astype(np.float64), ids_ref, w_ref, kw.get("rows"))
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_stacks_in_separate_buffers_use_the_gathered_path():
    rng = np.random.default_rng(0)
    g = ExpertStack(random_blocks(int(G.Q4_K), (4 * 256, 256), rng).reshape(4, 256, -1), int(G.Q4_K), 256)
    u = ExpertStack(random_blocks(int(G.Q4_K), (4 * 256, 256), rng).reshape(4, 256, -1), int(G.Q4_K), 256)
    d = ExpertStack(random_blocks(int(G.Q8_0), (4 * 256, 256), rng).reshape(4, 256, -1), int(G.Q8_0), 256)
    re = moe.RoutedExperts(g, u, d)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    out = _run(re, x, np.array([[0, 2]]), np.array([[0.5, 0.5]], np.float32), True)
    assert re._fused is not None and not re._fused.ok and out.shape == (1, 256)
