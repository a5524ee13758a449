"""dsd against llama.cpp's own graphs for qwen2, qwen3 and glm4moe (the converted checkpoints of
tests/test_qwen_dense.py and tests/test_glm4_moe.py), through llama-imatrix's perplexity
(tests/reference/llama_cpp_ppl.py: mean next-token NLL per chunk of 32 tokens, 24 chunks).

Skipped where the yardstick build is absent (CI does not compile llama.cpp).

f32: dsd equals llama.cpp to 3e-4 relative per chunk (measured max 1.1e-4 qwen2, 3e-5 qwen3,
2.4e-5 glm4moe; llama.cpp keeps K/V in f16) and transformers to 1e-5.
q8_0: both err against transformers' float32 NLL by the quantization; per chunk that error is a
signed noise (the same file, exact activations, lands on either side of llama.cpp's), so the
comparison is of the mean over 24 chunks of |NLL - transformers'|, within 1.5x llama.cpp's
(measured dsd / llama.cpp: qwen2 0.051 / 0.067, qwen3 0.0053 / 0.0047, glm4moe 0.0108 / 0.0122).
"""
from __future__ import annotations

import numpy as np
import pytest

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.tokenizer import Tokenizer
from tests.reference.hf_convert import hf_logits_f32
from tests.reference.llama_cpp_ppl import chunk_nll, llama_cpp_chunk_nll, llama_imatrix, sample_text

N_CTX, N_CHUNKS = 32, 24

pytestmark = pytest.mark.skipif(llama_imatrix() is None, reason="llama.cpp's llama-imatrix is not built "
                                "(bench/build_yardsticks.sh); CI does not compile llama.cpp")


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "glm4moe"])
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "glm4moe":
        from tests.test_glm4_moe import _Case
        c = _Case(d)
    else:
        from tests.test_qwen_dense import _Case
        c = _Case(request.param, d)
    text = sample_text()
    ids = Tokenizer.from_metadata(open_gguf(c.f32).metadata).encode(text, add_bos=False)
    c.text, c.ids, c.dir = text, ids, d
    c.hf_nll = chunk_nll(lambda ch: hf_logits_f32(c.hf, ch), ids, N_CTX, N_CHUNKS)
    return c


def _dsd_nll(path, ids):
    m = build_model(open_gguf(path))
    return chunk_nll(lambda ch: m.forward(Batch.single(m.new_cache(N_CTX), ch, all_logits=True)),
                     ids, N_CTX, N_CHUNKS)


def test_f32_equals_llama_cpp(case):
    theirs = llama_cpp_chunk_nll(case.f32, case.text, N_CTX, N_CHUNKS, case.dir)
    ours = _dsd_nll(case.f32, case.ids)
    print(f"f32 NLL max relative difference to llama.cpp {np.abs(ours / theirs - 1).max():.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=3e-4)
    np.testing.assert_allclose(ours, case.hf_nll, rtol=1e-5)


def test_q8_0_no_worse_than_llama_cpp(case):
    theirs = llama_cpp_chunk_nll(case.q8, case.text, N_CTX, N_CHUNKS, case.dir)
    ours = _dsd_nll(case.q8, case.ids)
    e_theirs = float(np.abs(theirs - case.hf_nll).mean())
    e_ours = float(np.abs(ours - case.hf_nll).mean())
    print(f"{case.arch if hasattr(case, 'arch') else 'glm4moe'} q8_0 mean |NLL - transformers|: "
          f"dsd {e_ours:.4g}, llama.cpp {e_theirs:.4g}")
    assert e_ours <= 1.5 * e_theirs + 1e-4, (e_ours, e_theirs)
