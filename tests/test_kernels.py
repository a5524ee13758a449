"""Kernels vs gguf-py's reference dequantization (gguf.quants.dequantize, which we did not write)
and a float64 numpy product of that reference."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dsd.errors import DsdError
from dsd.shard.kernels import QUANT_TYPES, dequantize, matmul, matvec, quant_type, row_bytes

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


@pytest.mark.parametrize("realistic", [True, False])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_matvec_matches_float64(gt, realistic):
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
