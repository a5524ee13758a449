"""Kernels vs gguf-py's reference dequantization (gguf.quants.dequantize, which we did not write)
and a float64 numpy product of that reference."""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.errors import DsdError
from dsd.shard.kernels import QUANT_TYPES, dequantize, matmul, matvec, matvec_gather, quant_type, row_bytes
from dsd.shard.kernels import exact_activations, registry


@pytest.fixture(autouse=True)
def _exact(request):
    """These tests hold the float kernels to float32 rounding (1e-5 of sum |w x|); the 8-bit
    activation path of Q4_K (registry.INT8_ACTIVATIONS) has its own tests, marked int8."""
    if request.node.get_closest_marker("int8"):
        yield
        return
    with exact_activations():
        yield

@pytest.mark.int8
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_q6k_int8_activations_within_rounding_bound(parallel, monkeypatch):
    """Q6_K (the output, attn_v and half of the ffn_down tensors of Q4_K_M files) with x
    quantized per 256 elements and its 16-element integer sums (llama.cpp's Q8_K): matvec,
    matvec_gather and matmul within the rounding bound, also on a worker's row and column share."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: Q6_K runs the float kernels (tested above)")
    from dsd.shard.kernels import matvec_gather
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(6)
    n = 1024
    stack = np.stack([random_raw(G.Q6_K, 48, n, rng, False) for _ in range(3)])
    W = np.stack([reference(stack[e], G.Q6_K, n) for e in range(3)]).astype(np.float64)
    X = rng.standard_normal((3, n)).astype(np.float32)
    X[1, 256:512] *= 50  # one super-block of large activations
    for j in range(2):
        got = matvec(stack[1], int(G.Q6_K), X[j]).astype(np.float64)
        err = np.abs(got - W[1] @ X[j])
        bound = _int8_bound(W[1], X[j:j + 1])[:, 0]
        assert np.all(err <= bound) and err.mean() < 0.25 * bound.mean(), (err / bound).max()
    ids, xi = [2, 0, 2], [0, 1, 2]
    got = matvec_gather(stack, int(G.Q6_K), ids, X, xi)
    for i, (e, j) in enumerate(zip(ids, xi)):
        assert np.all(np.abs(got[i] - W[e] @ X[j]) <= _int8_bound(W[e], X[j:j + 1])[:, 0])
    for T in (5, 40):  # batches and prompts: each row decoded once per 16 vectors
        Xb = rng.standard_normal((T, n)).astype(np.float32)
        got = matmul(stack[2], int(G.Q6_K), Xb)
        assert np.all(np.abs(got - Xb.astype(np.float64) @ W[2].T) <= _int8_bound(W[2], Xb).T)
    sub = stack[:, 8:40, 210:420]  # rows 8:40, the second super-block of columns
    got = matvec_gather(sub, int(G.Q6_K), [1], X[1:2, 256:512])
    assert np.all(np.abs(got[0] - W[1, 8:40, 256:512] @ X[1, 256:512])
                  <= _int8_bound(W[1, 8:40, 256:512], X[1:2, 256:512])[:, 0])


# Byte offsets of fp16 fields inside one block (sanitised to finite values in random blocks).
F16_FIELDS = {G.Q4_0: [0], G.Q4_1: [0, 2], G.Q5_0: [0], G.Q5_1: [0, 2], G.Q8_0: [0],
              G.Q2_K: [80, 82], G.Q3_K: [108], G.Q4_K: [0, 2], G.Q5_K: [0, 2], G.Q6_K: [208]}
QUANTIZABLE = {G.F32, G.F16, G.BF16, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0}
ALL = [G.F32, G.F16, G.BF16, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0,
       G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K]


def random_raw(gt, rows, n_cols, rng, realistic):
    """(rows, row_bytes) uint8: gguf-quantized random normals, or random bytes with finite scales."""
    if realistic and gt in QUANTIZABLE:
        w = rng.standard_normal((rows, n_cols)).astype(np.float32)
        q = gq.quantize(w, gt)
        return np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)
    rb = row_bytes(int(gt), n_cols)
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    qt = quant_type(int(gt))
    blocks = raw.reshape(rows, -1, qt.type_size)
    if gt in (G.F16, G.BF16, G.F32):
        n = rows * n_cols
        vals = rng.standard_normal(n).astype(np.float32)
        if gt == G.F16:
            return vals.astype(np.float16).view(np.uint8).reshape(rows, rb)
        if gt == G.BF16:
            return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, rb)
        return vals.view(np.uint8).reshape(rows, rb)
    for off in F16_FIELDS[gt]:
        s = (rng.standard_normal(blocks.shape[:2]) * 0.05).astype(np.float16)
        blocks[:, :, off:off + 2] = s.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def reference(raw, gt, n_cols):
    ref = gq.dequantize(np.ascontiguousarray(raw), gt)
    if gt in (G.F32, G.F16):  # gguf-py expects typed arrays for these two
        ref = gq.dequantize(np.ascontiguousarray(raw).view(np.float32 if gt == G.F32 else np.float16), gt)
    return np.asarray(ref, dtype=np.float32).reshape(raw.shape[0], n_cols)


def cols_for(gt):
    return 512 if QUANT_TYPES[int(gt)].block_size == 256 else 96


def assert_close_product(got, W64, x64):
    ref = W64 @ x64
    bound = np.abs(W64) @ np.abs(x64)
    err = np.abs(got.astype(np.float64) - ref)
    # float32 accumulation over <= a few thousand terms: far below 1e-5 of sum |w x|
    assert np.all(err <= 1e-5 * bound + 1e-30), (err / (bound + 1e-30)).max()


@pytest.mark.parametrize("realistic", [True, False])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_dequantize_bit_exact(gt, realistic):
    rng = np.random.default_rng(int(gt) * 7 + realistic)
    n_cols = cols_for(gt)
    raw = random_raw(gt, 37, n_cols, rng, realistic)
    got = dequantize(raw, int(gt), n_cols)
    ref = reference(raw, gt, n_cols)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("realistic", [True, False])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_matvec_matches_float64(gt, realistic, parallel, monkeypatch):
    from dsd.shard.kernels import registry
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 11 + realistic)
    n_cols = cols_for(gt) * 4
    for rows in (1, 7, 64, 203):  # odd row counts exercise the row-group tails
        raw = random_raw(gt, rows, n_cols, rng, realistic)
        x = rng.standard_normal(n_cols).astype(np.float32)
        W64 = reference(raw, gt, n_cols).astype(np.float64)
        got = matvec(raw, int(gt), x)
        assert got.dtype == np.float32 and got.shape == (rows,)
        assert_close_product(got, W64, x.astype(np.float64))
        out = np.full(rows, np.nan, dtype=np.float32)
        assert matvec(raw, int(gt), x, out=out) is out
        assert_close_product(out, W64, x.astype(np.float64))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_matvec_gather_matches_float64(gt, parallel, monkeypatch):
    """One call over chosen matrices of a stack (experts, MLA heads): every (matrix, vector)
    pair equals its own float64 product, also on row ranges and block-aligned column slices."""
    from dsd.shard.kernels import matvec_gather, registry
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(int(gt) * 13 + 1)
    bs = QUANT_TYPES[int(gt)].block_size
    n_cols, rows, E = cols_for(gt) * 2, 40, 6
    stack = np.stack([random_raw(gt, rows, n_cols, rng, True) for _ in range(E)])
    W = np.stack([reference(stack[e], gt, n_cols) for e in range(E)]).astype(np.float64)
    ids = np.array([4, 1, 4, 5])
    X = rng.standard_normal((4, n_cols)).astype(np.float32)
    got = matvec_gather(stack, int(gt), ids, X)
    assert got.shape == (4, rows)
    for i, e in enumerate(ids):
        assert_close_product(got[i], W[e], X[i].astype(np.float64))
    shared = matvec_gather(stack, int(gt), ids[:3], X[2:3])  # one x for all chosen matrices
    for i, e in enumerate(ids[:3]):
        assert_close_product(shared[i], W[e], X[2].astype(np.float64))
    # a worker's share: rows 8:24 of every matrix, and the second half of the columns
    half = n_cols // 2 // bs * bs
    rb0 = half // bs * QUANT_TYPES[int(gt)].type_size
    sub = stack[:, 8:24, rb0:]
    got = matvec_gather(sub, int(gt), [0, 3], X[:2, half:])
    for i, e in enumerate([0, 3]):
        assert_close_product(got[i], W[e, 8:24, half:], X[i, half:].astype(np.float64))
    with pytest.raises(DsdError, match="matrix ids"):
        matvec_gather(stack, int(gt), [E], X[:1])


@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_column_slice_and_readonly_memmap(gt, tmp_path):
    """raw[:, c0:c1] of a wider matrix (row stride > row_bytes) stored in a read-only memmap."""
    rng = np.random.default_rng(int(gt) + 100)
    bs = QUANT_TYPES[int(gt)].block_size
    wide_cols = 12 * max(bs, 32)
    rows = 300
    wide = random_raw(gt, rows, wide_cols, rng, realistic=True)
    path = tmp_path / "w.bin"
    wide.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=wide.shape)
    c0_el, c1_el = 3 * max(bs, 32), 9 * max(bs, 32)
    b0, b1 = row_bytes(int(gt), c0_el), row_bytes(int(gt), c1_el)
    view = mm[:, b0:b1]
    assert not view.flags.c_contiguous and not view.flags.writeable
    n_cols = c1_el - c0_el
    ref = reference(wide, gt, wide_cols)[:, c0_el:c1_el]
    got = dequantize(view, int(gt), n_cols)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    x = rng.standard_normal(n_cols).astype(np.float32)
    assert_close_product(matvec(view, int(gt), x), ref.astype(np.float64), x.astype(np.float64))
    X = rng.standard_normal((5, n_cols)).astype(np.float32)
    got = matmul(view, int(gt), X)
    ref64 = ref.astype(np.float64)
    for t in range(5):
        assert_close_product(got[t], ref64, X[t].astype(np.float64))
    del mm, view


@pytest.mark.parametrize("T", [17, 33, 1100])  # fused in 16-vector chunks (1-vector tail: matvec), dequantize + sgemm
@pytest.mark.parametrize("gt", [G.Q4_1, G.Q8_0, G.Q4_K, G.Q6_K, G.F16], ids=lambda g: g.name)
def test_matmul_matches_float64(gt, T, monkeypatch):
    from dsd.shard.kernels import registry
    assert (T <= registry.FUSED_CHUNKS_MAX_T) == (T < 1100)
    monkeypatch.setattr(registry, "_TILE_ELEMS", 70 * 1024)  # several tiles + a partial one
    rng = np.random.default_rng(int(gt) + 200)
    n_cols = 1024
    raw = random_raw(gt, 250, n_cols, rng, realistic=True)
    X = rng.standard_normal((T, n_cols)).astype(np.float32)
    W64 = reference(raw, gt, n_cols).astype(np.float64)
    buf = np.full((T + 4, 250), np.nan, dtype=np.float32)
    out = buf[:T]
    got = matmul(raw, int(gt), X, out=out)
    assert got is out
    assert np.isnan(buf[T:]).all()  # nothing written past the output rows
    ref = X.astype(np.float64) @ W64.T
    bound = np.abs(X.astype(np.float64)) @ np.abs(W64).T
    assert np.all(np.abs(got - ref) <= 1e-5 * bound)


def _ncols_variants(gt):
    """Row lengths that leave remainder blocks after the 4-block super-blocks (32-element
    types) and tail columns after the 32-element SIMD blocks (float types)."""
    bs = QUANT_TYPES[int(gt)].block_size
    if bs == 256:
        return [256, 768]
    if bs == 32:
        return [32, 96, 576]
    return [7, 100, 576]


@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_matvec_remainders_and_tails(gt, monkeypatch):
    from dsd.shard.kernels import registry
    rng = np.random.default_rng(int(gt) + 300)
    for parallel in (False, True):
        monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
        for n_cols in _ncols_variants(gt):
            raw = random_raw(gt, 9, n_cols, rng, realistic=True)
            ref = reference(raw, gt, n_cols)
            np.testing.assert_array_equal(dequantize(raw, int(gt), n_cols).view(np.uint32), ref.view(np.uint32))
            x = rng.standard_normal(n_cols).astype(np.float32)
            assert_close_product(matvec(raw, int(gt), x), ref.astype(np.float64), x.astype(np.float64))


@pytest.mark.parametrize("gt", [G.Q4_1, G.Q4_K, G.Q5_0, G.Q6_K, G.Q8_0, G.F16, G.Q3_K], ids=lambda g: g.name)
def test_fused_small_batch_matmul(gt, monkeypatch):
    """T = 1..17 covers the fused kernel's 4-, 2- and 1-vector passes (and T > FUSED_MAX_T the
    BLAS path); 21..23 rows cover the 1..3-row tails; serial and parallel, 2- and 4-row drivers."""
    from dsd.shard.kernels import registry
    rng = np.random.default_rng(int(gt) + 400)
    n_cols = 100 if gt == G.F16 else _ncols_variants(gt)[-1]  # F16: 3 SIMD blocks + 4 tail columns
    raw = random_raw(gt, 23, n_cols, rng, realistic=True)
    W64 = reference(raw, gt, n_cols).astype(np.float64)
    for parallel, wide in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
        monkeypatch.setattr(registry, "_WIDE", wide)  # 4-row (AVX-512) and 2-row passes
        for nr, Ts in ((23, range(1, 18)), (22, (2, 5, 8)), (21, (3, 16))):
            for T in Ts:
                X = rng.standard_normal((T, n_cols)).astype(np.float32)
                got = matmul(raw[:nr], int(gt), X)
                assert got.shape == (T, nr)
                ref = X.astype(np.float64) @ W64[:nr].T
                bound = np.abs(X.astype(np.float64)) @ np.abs(W64[:nr]).T
                assert np.all(np.abs(got - ref) <= 1e-5 * bound), (gt, T, nr, parallel, wide)
    # a non-contiguous out is filled too
    X = rng.standard_normal((6, n_cols)).astype(np.float32)
    big = np.zeros((6, 46), np.float32)
    matmul(raw, int(gt), X, out=big[:, ::2])
    np.testing.assert_allclose(big[:, ::2], X @ W64.T.astype(np.float32), rtol=1e-4, atol=1e-3)


_ISA_PROBE = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_kernels import random_raw, reference, G, _isa_results
from dsd.shard.kernels import dequantize, matvec, matmul, exact_activations
from numba.core.registry import cpu_target
print(json.dumps({"features": cpu_target.target_context.codegen()._tm_features,
                  **_isa_results(random_raw, reference, G, dequantize, matvec, matmul, exact_activations)}))
"""


def _isa_results(random_raw, reference, G, dequantize, matvec, matmul, exact_activations):
    """Per type: dequantization exact, the float path's errors, and (where this CPU has an 8-bit
    path) the 8-bit matvec/matmul outputs themselves, to compare across instruction sets."""
    res = {}
    rng = np.random.default_rng(5)
    for gt in (G.Q4_1, G.Q4_K, G.Q5_K, G.Q5_0, G.Q6_K, G.Q8_0, G.F16, G.Q3_K):
        n = 576 if gt not in (G.Q4_K, G.Q5_K, G.Q6_K, G.Q3_K) else 768
        raw = random_raw(gt, 13, n, rng, realistic=True)
        ref = reference(raw, gt, n).astype(np.float64)
        x = rng.standard_normal(n).astype(np.float32)
        X = rng.standard_normal((5, n)).astype(np.float32)
        bound = np.abs(ref) @ np.abs(x)
        with exact_activations():
            r = {"deq_exact": bool(np.array_equal(dequantize(raw, int(gt), n), ref.astype(np.float32))),
                 "mv_err": float(np.max(np.abs(matvec(raw, int(gt), x) - ref @ x) / bound)),
                 "mm_err": float(np.max(np.abs(matmul(raw, int(gt), X) - X @ ref.T) / (np.abs(X) @ np.abs(ref).T)))}
        r["mv_i8"] = matvec(raw, int(gt), x).tolist()
        r["mm_i8"] = matmul(raw, int(gt), X).tolist()
        res[gt.name] = r
    return res
AVX2_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,"
                 "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512bw,"
                 "-avx512vl,-avx512dq,-avx512cd")


@pytest.mark.parametrize("cpu", ["haswell-avx2", "generic"])
def test_correct_without_avx512(cpu):
    """The target machines are AVX2 without AVX-512 (this dev host has AVX-512): the kernels
    must compile and be correct for an AVX2 feature set and for baseline x86-64 (no F16C:
    the fp16 bit-trick path). NUMBA_CPU_NAME alone keeps the host's features, so the feature
    list is given explicitly; a private cache dir keeps these builds apart."""
    import json
    env = dict(os.environ)
    if cpu == "generic":
        env["NUMBA_CPU_NAME"] = "generic"
    else:
        env["NUMBA_CPU_NAME"] = "haswell"
        env["NUMBA_CPU_FEATURES"] = AVX2_FEATURES
    with tempfile.TemporaryDirectory() as d:
        env["NUMBA_CACHE_DIR"] = d
        out = subprocess.run([sys.executable, "-c", _ISA_PROBE, os.path.dirname(__file__)], env=env,
                             check=True, capture_output=True, text=True).stdout
    res = json.loads(out)
    assert "+avx512f" not in res.pop("features")
    for name, r in res.items():
        assert r["deq_exact"], name
        assert r["mv_err"] < 1e-5 and r["mm_err"] < 1e-5, (name, r)
    # The default path there: the AVX2 build of the 8-bit kernels (vpmaddubsw + vpmaddwd in place
    # of VNNI) gives this process's results bit for bit (on an AVX-512 host: the VNNI kernels)
    if cpu == "haswell-avx2" and registry.INT8_ACTIVATIONS:
        here = _isa_results(random_raw, reference, G, dequantize, matvec, matmul, exact_activations)
        for name in ("Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"):
            assert res[name]["mv_i8"] == here[name]["mv_i8"], name
            assert res[name]["mm_i8"] == here[name]["mm_i8"], name


def test_parallel_backs_off_after_a_stalled_call(monkeypatch):
    """A parallel call far slower than the single-thread estimate (another process holding a
    core) switches kernels to serial for PAR_BACKOFF_S; afterwards parallel is tried again."""
    from dsd.shard.kernels import registry
    monkeypatch.setattr(registry, "_par_off_until", 0.0)
    monkeypatch.setattr(registry, "_serial_rate", 8e9)
    nbytes = 1 << 20
    assert registry._par_ok(nbytes) and not registry._par_ok(1024)
    registry._note(True, nbytes, 0.2e-3)   # 0.2 ms for 1 MiB: fine
    assert registry._par_ok(nbytes)
    registry._note(True, nbytes, 4e-3)     # a 4 ms scheduler-slice stall
    assert not registry._par_ok(nbytes)
    monkeypatch.setattr(registry, "_par_off_until", time.monotonic() - 1)
    assert registry._par_ok(nbytes)
    # serial calls refine the rate estimate
    registry._note(False, nbytes, nbytes / 4e9)
    assert 4e9 < registry._serial_rate < 8e9


def test_errors_name_the_problem():
    with pytest.raises(DsdError, match="Q8_1"):  # an activation type, never a stored weight
        quant_type(int(G.Q8_1))
    with pytest.raises(DsdError, match="not supported"):
        row_bytes(9999, 32)
    with pytest.raises(DsdError, match="multiple of the Q4_K block size 256"):
        row_bytes(int(G.Q4_K), 300)
    assert row_bytes(int(G.Q4_1), 576) == 18 * 20
    assert row_bytes(int(G.F16), 10) == 20
    raw = np.zeros((4, 40), np.uint8)
    with pytest.raises(DsdError, match="x has shape"):
        matvec(raw, int(G.Q4_1), np.zeros(63, np.float32))
    with pytest.raises(DsdError, match="bytes per row"):
        dequantize(raw, int(G.Q4_1), 32)
    with pytest.raises(DsdError, match="uint8"):
        matvec(raw.astype(np.int16), int(G.Q4_1), np.zeros(64, np.float32))
    # float64 / strided x is converted, not rejected
    np.testing.assert_array_equal(matvec(raw, int(G.Q4_1), np.ones(128)[::2]), np.zeros(4))


def test_registry_records():
    for gt in ALL:
        qt = QUANT_TYPES[int(gt)]
        assert qt.name == gt.name and qt.ggml_type == int(gt)
        assert (qt.block_size, qt.type_size) == __import__("gguf").constants.GGML_QUANT_SIZES[gt]


_CACHE_PROBE = r"""
import json, time, numpy as np
t0 = time.perf_counter()
from dsd.shard.kernels import matvec, dequantize, exact_activations, registry
from dsd.shard.kernels import drivers as dv, drivers_i8 as di
t1 = time.perf_counter()
raw = np.zeros((1024, 360), np.uint8)
with exact_activations():
    registry._par_off_until = 0.0
    matvec(raw, 3, np.ones(576, np.float32))        # parallel Q4_1 kernel
    matvec(raw[:8], 3, np.ones(576, np.float32))    # serial Q4_1 kernel
dequantize(raw[:8], 3, 576)                     # serial row dequantization (few rows)
i8 = registry.INT8_ACTIVATIONS                          # the 8-bit activation kernels, where they run
if i8:
    registry._par_off_until = 0.0  # a first call that loads from disk looks like a stall
    matvec(raw, 3, np.ones(576, np.float32))
    matvec(raw[:8], 3, np.ones(576, np.float32))
t2 = time.perf_counter()
fns = [dv.mv_parallel, dv.mv_serial, dv.deq_rows_serial]
# drivers specialise on the type id as a literal: count only those signatures (numba first
# tries, and counts as a miss, the plain int64 typing that literally() then rejects)
lit = lambda c: sum(v for k, v in c.items() if "Literal" in str(k[0]))
i8fns = [di.mv_i8_parallel, di.mv_i8_serial] if i8 else []
print(json.dumps({"import": t1 - t0, "first_calls": t2 - t1, "i8": i8,
                  "hits": sum(lit(f.stats.cache_hits) for f in fns + i8fns),
                  "misses": sum(lit(f.stats.cache_misses) for f in fns + i8fns)}))
"""


def test_second_process_loads_kernels_from_cache():
    """cache=True: a fresh process must load compiled kernels from disk, not recompile.
    Uses a private NUMBA_CACHE_DIR: the first process compiles (cache misses), the second must
    only hit the cache (numba's own per-dispatcher counters)."""
    import json
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        env["NUMBA_CACHE_DIR"] = d
        runs = [json.loads(subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, check=True,
                                          capture_output=True, text=True).stdout) for _ in range(2)]
        cached = [f for _, _, fs in os.walk(d) for f in fs if f.endswith(".nbc")]
    assert cached, "numba wrote no cache files"
    n = 5 if runs[0]["i8"] else 3
    assert runs[0]["misses"] == n and runs[0]["hits"] == 0, runs
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == n, runs


def test_warm_up_loads_every_product_kernel():
    """warm_up (a daemon worker calls it before reporting ready) leaves the compiled entry point
    of every product driver, serial and parallel, in the lookup cache for each type."""
    from dsd.shard.kernels import drivers as dv
    from dsd.shard.kernels import registry, warm_up

    assert warm_up([int(G.Q5_1)]) >= 0.0
    kinds = {(fn, kind) for fn, kind, _ in registry._EP}
    for fn in (dv.mv_serial, dv.mv_parallel, dv.mv_gather_serial, dv.mv_gather_parallel,
               dv.mm_direct_serial, dv.mm_direct_parallel, dv.deq_rows_serial):
        assert (fn, int(G.Q5_1)) in kinds, fn.__name__
    assert registry._par_off_until == 0.0  # the loading calls did not leave the back-off on



def _int8_bound(W64, X, blk=256):
    """Worst case of the 8-bit activation rounding: each x_i moves by at most half a step of its
    blk-element block (max|x| / 127 / 2), so |error| <= sum_b (max_b|x| / 254) sum_{i in b} |w_i|;
    plus float32 rounding (1e-5 of sum |w x|)."""
    n = X.shape[-1]
    amax = np.abs(X.reshape(*X.shape[:-1], n // blk, blk)).max(axis=-1)   # [..., n/blk]
    wsum = np.abs(W64).reshape(W64.shape[0], n // blk, blk).sum(axis=-1)  # [rows, n/blk]
    return wsum @ (amax.T / 254.0) + 1e-5 * (np.abs(W64) @ np.abs(X.T))


@pytest.mark.int8
@pytest.mark.parametrize("gt", [G.Q4_K, G.Q5_K], ids=["Q4_K", "Q5_K"])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_q4k_q5k_int8_activations_within_rounding_bound(gt, parallel, monkeypatch):
    """Q4_K / Q5_K products with 8-bit activations (VNNI, llama.cpp's Q8_K scheme): every output
    within the analytic bound of the activation rounding, through matvec, matvec_gather (also on
    a worker's row and column share) and matmul, and clearly closer than that bound on average."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: Q4_K / Q5_K run the float kernels (tested above)")
    from dsd.shard.kernels import matvec_gather
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(3)
    rows, n = 96, 1024
    stack = np.stack([random_raw(gt, rows, n, rng, False) for _ in range(3)])
    W = np.stack([reference(stack[e], gt, n) for e in range(3)]).astype(np.float64)
    X = rng.standard_normal((2, n)).astype(np.float32)
    X[1, :256] *= 50  # one block of large activations: a coarser step there only
    for j in range(2):
        got = matvec(stack[0], int(gt), X[j]).astype(np.float64)
        err = np.abs(got - W[0] @ X[j])
        bound = _int8_bound(W[0], X[j:j + 1])[:, 0]
        assert np.all(err <= bound), (err / bound).max()
        assert err.mean() < 0.25 * bound.mean()
    got = matvec_gather(stack, int(gt), [2, 0], X)
    for i, e in enumerate([2, 0]):
        assert np.all(np.abs(got[i] - W[e] @ X[i]) <= _int8_bound(W[e], X[i:i + 1])[:, 0])
    # a worker's share: rows 16:48, and the second 512 columns (two whole super-blocks)
    sub = stack[:, 16:48, 2 * quant_type(int(gt)).type_size:]
    got = matvec_gather(sub, int(gt), [1], X[1:, 512:])
    assert np.all(np.abs(got[0] - W[1, 16:48, 512:] @ X[1, 512:]) <= _int8_bound(W[1, 16:48, 512:], X[1:, 512:])[:, 0])
    # batches (decode of several sequences) and prompts: one decode of each row per 16 vectors
    # (40 = two full chunks and a partial one), the same bound per vector
    for T in (5, 40):
        Xb = rng.standard_normal((T, n)).astype(np.float32)
        got = matmul(stack[2], int(gt), Xb)
        assert np.all(np.abs(got - Xb.astype(np.float64) @ W[2].T) <= _int8_bound(W[2], Xb).T)
    with exact_activations():  # the switch: float activations, float32 rounding only
        exact = matvec(stack[0], int(gt), X[0]).astype(np.float64)
        assert np.all(np.abs(exact - W[0] @ X[0]) <= 1e-5 * (np.abs(W[0]) @ np.abs(X[0])))



@pytest.mark.int8
def test_q4_1_int8_activations_within_rounding_bound():
    """Q4_1 (SmolLM2's type) with x quantized per 32 elements (llama.cpp's Q8_1): matvec and
    matvec_gather within the rounding bound, with an odd number of blocks per row too."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: Q4_1 runs the float kernels (tested above)")
    from dsd.shard.kernels import matvec_gather
    rng = np.random.default_rng(4)
    for n in (576, 96):  # 18 and 3 blocks per row
        stack = np.stack([random_raw(G.Q4_1, 40, n, rng, True) for _ in range(2)])
        W = np.stack([reference(stack[e], G.Q4_1, n) for e in range(2)]).astype(np.float64)
        X = rng.standard_normal((2, n)).astype(np.float32)
        X[0, :32] *= 40
        got = matvec(stack[1], int(G.Q4_1), X[0]).astype(np.float64)
        bound = _int8_bound(W[1], X[:1], 32)[:, 0]
        err = np.abs(got - W[1] @ X[0])
        assert np.all(err <= bound) and err.mean() < 0.25 * bound.mean(), (err / bound).max()
        got = matvec_gather(stack, int(G.Q4_1), [1, 0], X)
        for i, e in enumerate([1, 0]):
            assert np.all(np.abs(got[i] - W[e] @ X[i]) <= _int8_bound(W[e], X[i:i + 1], 32)[:, 0])


@pytest.mark.parametrize("gt,T,calls", [(G.Q4_1, 8, 1), (G.Q8_0, 8, 1), (G.Q8_0, 40, 3), (G.Q8_0, 1100, 0)])
def test_matmul_dispatch_fused_chunks(gt, T, calls, monkeypatch):
    """Which path matmul takes (a speed property checked by call count, not by time): batched
    decode (T <= 16) always on the fused kernel; Q8_0 prompt chunks up to FUSED_CHUNKS_MAX_T in
    16-vector calls; longer ones through dequantize + sgemm."""
    from dsd.shard.kernels import registry
    seen = []
    real = registry._fused
    monkeypatch.setattr(registry, "_fused", lambda *a: (seen.append(a[-2].shape[0]), real(*a)))
    rng = np.random.default_rng(7)
    raw = random_raw(gt, 64, 256, rng, realistic=True)
    X = rng.standard_normal((T, 256)).astype(np.float32)
    got = matmul(raw, int(gt), X)
    assert len(seen) == calls and sum(seen) == (T if calls else 0)
    ref = X.astype(np.float64) @ reference(raw, gt, 256).astype(np.float64).T
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.int8
@pytest.mark.parametrize("n", [1024, 1408])  # 1408: the 1408-wide expert downs
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_q8_0_int8_within_rounding_bound_and_batch_invariant(n, parallel, monkeypatch):
    """Q8_0 products with x quantized per 64 elements (xq + 128 as the unsigned operand, the
    weights' 128 * sum q subtracted; on AVX2 the sign trick, the same integers): matvec, matvec_gather, decode batches and
    prompts (16-vector chunks and their tails) within the analytic bound of the activation
    rounding; a token's row is bit-identical whether it runs alone (matvec) or beside others
    (matmul, any T); on a column share (row stride larger than the row), equal to the same
    columns of the whole row; an odd number of blocks stays on the float kernels."""
    if not registry.INT8_ACTIVATIONS or int(G.Q8_0) not in registry._I8_KINDS:
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: Q8_0 runs the float kernels (tested above)")
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(n)
    raw = random_raw(G.Q8_0, 40, n, rng, realistic=True)
    W = reference(raw, G.Q8_0, n).astype(np.float64)
    X = rng.standard_normal((40, n)).astype(np.float32)
    X[-1, 256:512] *= 50  # one group of large activations
    alone = np.stack([matvec(raw, int(G.Q8_0), x) for x in X])
    for T in (2, 8, 17, 40):  # decode batches and prompts
        got = matmul(raw, int(G.Q8_0), X[-T:])
        assert np.array_equal(got, alone[-T:]), T  # batch invariance
        err = np.abs(got.astype(np.float64) - X[-T:].astype(np.float64) @ W.T)
        bound = _int8_bound(W, X[-T:], 64).T
        assert np.all(err <= bound), (T, (err / bound).max())
        assert err.mean() < 0.25 * bound.mean()
        assert err.max() > 1e-7 * np.abs(got).max()  # the 8-bit path ran (float32 alone is closer)
    stack = raw.reshape(4, 10, -1)
    got = matvec_gather(stack, int(G.Q8_0), [3, 0, 3], X[:3])
    for i, e in enumerate([3, 0, 3]):
        assert np.array_equal(got[i], matvec(stack[e], int(G.Q8_0), X[i]))
    sub = raw[:, 34 * 8:34 * 26]  # blocks 8:26 of every row, row stride n / 32 * 34
    X = rng.standard_normal((20, n)).astype(np.float32)
    got = matmul(sub, int(G.Q8_0), X[:, 256:832])
    assert np.all(np.abs(got - X[:, 256:832].astype(np.float64) @ W[:, 256:832].T)
                  <= _int8_bound(W[:, 256:832], X[:, 256:832], 64).T)
    # a worker's column share sees the same 8-bit x as the whole row: shares add up to it
    rest = [matmul(raw[:, :34 * 8], int(G.Q8_0), X[:, :256]), matmul(raw[:, 34 * 26:], int(G.Q8_0), X[:, 832:])]
    whole = matmul(raw, int(G.Q8_0), X)
    assert np.abs(got + rest[0] + rest[1] - whole).max() <= 1e-5 * np.abs(whole).max()
    odd = random_raw(G.Q8_0, 24, 32 * 43, rng, realistic=True)  # 43 blocks: float kernels
    Wo = reference(odd, G.Q8_0, 32 * 43).astype(np.float64)
    X = rng.standard_normal((20, 32 * 43)).astype(np.float32)
    ref = X.astype(np.float64) @ Wo.T
    assert np.abs(matmul(odd, int(G.Q8_0), X) - ref).max() <= 1e-5 * (np.abs(X) @ np.abs(Wo).T).max()
    assert np.abs(matvec(odd, int(G.Q8_0), X[0]) - ref[0]).max() <= 1e-5 * (np.abs(X[0]) @ np.abs(Wo).T).max()
