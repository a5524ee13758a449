"""Accuracy on real quantizations (issue 15, point 5): tests/fixtures/iq/blocks.npz holds
llama.cpp's own IQ1_S ... TQ2_0 quantizations (llama-imatrix + llama-quantize, see
make_fixtures.py) of one 256 x 256 matrix (blk.0.ffn_down) of tests/tiny_iq.py's float32 model.

The truth is the float model's float64 forward pass (tests/reference/llama_ref.py, gguf-py
weights, no dsd code); the error of a run is the median over 32 positions of
max_vocab |logits - truth| / max_vocab |truth|.  dsd must add nothing measurable to the error the
quantized weights themselves cause (the same float64 forward pass over gguf.quants.dequantize of
the quantized file), on the default path and with DSD_EXACT_ACTIVATIONS; and be no worse than
1.05 x llama.cpp's error on the same file -- live through llama-cpp-python where it is
installed, else against llama.cpp's logits recorded with the fixtures (llama_logits.npz)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.kernels import dequantize, exact_activations, registry
from dsd.shard.kernels.rows_iq8 import IQ8_KINDS
from dsd.shard.models import build_model
from tests.fixtures.iq.make_fixtures import TENSOR, TYPES, llama_cpp_logits, test_tokens
from tests.reference.llama_ref import llama_logits
from tests.tiny_iq import float_weights, write_model

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "iq")
BLOCKS = np.load(os.path.join(HERE, "blocks.npz"))
_LL = os.path.join(HERE, "llama_logits.npz")  # llama.cpp's logits on each file, for CI
LLAMA = np.load(_LL)
# relative rms error of the quantized matrix against the float one (Gaussian weights: the hard
# case for the lattice codes; TQ is meant for ternary-trained weights).  Measured with the
# committed fixtures: IQ1_S 0.51, IQ1_M 0.48, IQ2_XXS 0.36, IQ2_XS 0.31, IQ2_S 0.26, IQ3_XXS 0.19,
# IQ3_S 0.14, IQ4_NL / IQ4_XS 0.077, MXFP4 0.115, TQ1_0 / TQ2_0 0.81
WEIGHT_ERR = {"IQ1_S": 0.55, "IQ1_M": 0.52, "IQ2_XXS": 0.40, "IQ2_XS": 0.35, "IQ2_S": 0.29,
              "IQ3_XXS": 0.22, "IQ3_S": 0.16, "IQ4_NL": 0.09, "IQ4_XS": 0.09, "MXFP4": 0.13,
              "TQ1_0": 0.85, "TQ2_0": 0.85}


def _err(got, truth):
    return float(np.median(np.abs(got - truth).max(-1) / np.abs(truth).max(-1)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("iqacc")
    toks = test_tokens()
    truth = llama_logits(write_model(d / "f32.gguf"), toks)
    files = {t: write_model(d / f"{t}.gguf", replace={TENSOR: (BLOCKS[t], Q[t])}) for t in TYPES}
    return toks, truth, files


def test_fixtures_are_real_quantizations_that_decode_exactly():
    """Every type is there; dsd decodes llama-quantize's blocks bit-exactly as gguf-py does; each
    is a quantization of the float matrix with the error its bit budget allows (a misread layout
    or the wrong matrix would be far off)."""
    W = float_weights()[TENSOR].astype(np.float64)
    assert sorted(BLOCKS.files) == sorted(TYPES)
    for t in TYPES:
        raw = BLOCKS[t]
        ref = np.asarray(gq.dequantize(raw, Q[t]), np.float32)
        got = dequantize(raw, int(Q[t]), 256)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        rel = np.sqrt(((ref - W) ** 2).mean() / (W ** 2).mean())
        assert rel < WEIGHT_ERR[t], (t, rel)
    errs = [np.sqrt(((gq.dequantize(BLOCKS[t], Q[t]) - W) ** 2).mean()) for t in
            ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")]
    assert errs == sorted(errs, reverse=True)  # more bits, less error


@pytest.mark.parametrize("t", TYPES)
def test_dsd_adds_no_error_beyond_the_weights(models, t):
    toks, truth, files = models
    path = files[t]
    ref = llama_logits(path, toks)  # float64 over gguf-py's dequantization of the quantized file
    m = build_model(open_gguf(path))
    fast = m.forward(Batch.single(m.new_cache(64), toks, all_logits=True))
    with exact_activations():
        exact = m.forward(Batch.single(m.new_cache(64), toks, all_logits=True))
    base = _err(ref, truth)
    assert base > 0.01  # the quantization is visible at all
    assert _err(exact, ref) < 1e-5
    assert _err(exact, truth) <= 1.001 * base
    # default: the types of rows_iq8.IQ8_KINDS (all twelve since rows_iq1.py: IQ1_S, IQ1_M and
    # TQ1_0 too) take 8-bit activations (llama.cpp's scheme): their rounding comes on top
    # (measured 0.008-0.0142, IQ1_S / IQ1_M 0.0136 / 0.0133, TQ1_0 0.0142; the weights'
    # 0.07-0.73), and is judged against llama.cpp's own on the same file below (IQ1_S: 0.467
    # both); without 8-bit kernels (DSD_EXACT_ACTIVATIONS=1, no AVX2): the exact path
    e = _err(fast, ref)
    if registry.INT8_ACTIVATIONS and int(Q[t]) in IQ8_KINDS:
        assert e < 0.02 and e < 0.25 * base
        assert _err(fast, truth) <= 1.1 * base
    else:
        assert e < 1e-5


def _llama_cpp_live(path):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return llama_cpp_logits(path).astype(np.float64)


@pytest.mark.parametrize("t", TYPES)
def test_no_worse_than_llama_cpp_on_the_same_file(models, t):
    """Against llama.cpp's error on the same file: live where llama-cpp-python is installed
    (and then the recorded logits must still describe this llama.cpp: same errors within 2%),
    else its logits recorded with the fixtures (llama_logits.npz, float16)."""
    toks, truth, files = models
    recorded = LLAMA[t].astype(np.float64)
    live = _llama_cpp_live(files[t])
    if live is not None:
        assert abs(_err(live, truth) / _err(recorded, truth) - 1) < 0.02
    theirs = recorded if live is None else live
    m = build_model(open_gguf(files[t]))
    ours = m.forward(Batch.single(m.new_cache(64), toks, all_logits=True))
    e_ours, e_theirs = _err(ours, truth), _err(theirs, truth)
    assert e_theirs < 1.5 * e_ours  # llama.cpp ran this file (not another matrix or tokens)
    assert e_ours <= 1.05 * e_theirs, (t, e_ours, e_theirs)
