"""The llama model against an independent float64 reference, and cache consistency."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.kernels import exact_activations
from tests.reference.llama_ref import llama_logits
from tests.tiny_llama import write_tiny_llama

TOKENS = [3, 17, 42, 5, 88, 1, 60, 33, 9, 71, 12, 50]


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("qtype,tied,n_kv", [(Q.F32, False, 2), (Q.F32, True, 4), (Q.Q8_0, False, 1)])
def test_logits_match_float64_reference(tmp_path, qtype, tied, n_kv):
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype=qtype, tied=tied, n_kv=n_kv)
    model = build_model(open_gguf(path))
    with exact_activations():  # the architecture in float32 (8-bit products: tests/test_kernels.py)
        got = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    ref = llama_logits(path, TOKENS)
    assert got.shape == (len(TOKENS), 96) and got.dtype == np.float32
    # F32 weights: float32 math vs float64 math. Q8_0: the reference dequantizes the same blocks.
    assert _rel_err(got, ref) <= 1e-3


def test_prefill_equals_token_by_token_decode(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=3)
    model = build_model(open_gguf(path))
    full = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    cache = model.new_cache(64)
    # a chunked prefill then single-token steps must reproduce every row
    rows = [model.forward(Batch.single(cache, TOKENS[:5], all_logits=True))]
    for t in TOKENS[5:]:
        rows.append(model.forward(Batch.single(cache, [t])))
    step = np.concatenate(rows)
    assert cache.length == len(TOKENS)
    assert _rel_err(step, full) <= 1e-5


def test_batched_decode_equals_separate_sequences(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    model = build_model(open_gguf(path))
    prompts = [TOKENS[:4], TOKENS[3:10], TOKENS[:1]]
    caches = [model.new_cache(64) for _ in prompts]
    for c, p in zip(caches, prompts):
        model.forward(Batch.single(c, p))
    nxt = [7, 8, 9]
    batched = model.forward(Batch.decode(caches, nxt))
    for j, (p, t) in enumerate(zip(prompts, nxt)):
        alone = model.forward(Batch.single(model.new_cache(64), p + [t]))
        assert _rel_err(batched[j:j + 1], alone) <= 1e-5
