"""Mixtral (llama arch + experts) against float64 numpy and transformers' MixtralForCausalLM."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.kernels import exact_activations
from tests.reference.moe_hf import hf_logits
from tests.reference.moe_ref import gqa_moe_logits
from tests.tiny_moe import write_tiny_mixtral

TOKENS = [3, 17, 42, 5, 88, 1, 60, 33, 9, 71, 12, 50]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("qtype,E,k", [(Q.F32, 8, 2), (Q.Q8_0, 16, 4)])
def test_mixtral_matches_references(tmp_path, qtype, E, k):
    path = write_tiny_mixtral(tmp_path / "mx.gguf", qtype=qtype, E=E, k=k)
    model = build_model(open_gguf(path))
    with exact_activations():  # the architecture in float32 (8-bit products: tests/test_kernels.py)
        got = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    assert rel_err(got, gqa_moe_logits(path, TOKENS)) <= 1e-3
    assert rel_err(got, hf_logits(path, TOKENS)) <= 1e-3


def test_mixtral_cli_logits_and_decode(tmp_path):
    path = write_tiny_mixtral(tmp_path / "mx.gguf", n_layers=3)
    out = tmp_path / "x.npy"
    subprocess.run([sys.executable, "-m", "dsd.cli", "logits", "--model", path,
                    "--tokens", " ".join(map(str, TOKENS)), "--out", str(out)], check=True)
    cli = np.load(out)
    assert rel_err(cli, hf_logits(path, TOKENS)) <= 1e-3
    model = build_model(open_gguf(path))
    cache = model.new_cache(64)
    rows = [model.forward(Batch.single(cache, TOKENS[:4], all_logits=True))]
    rows += [model.forward(Batch.single(cache, [t])) for t in TOKENS[4:]]
    assert rel_err(np.concatenate(rows), cli) <= 1e-5
