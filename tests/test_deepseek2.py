"""DeepSeek V2/V3 (MLA + DeepSeekMoE) against transformers and a float64 naive-MLA reference."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.moe import moe_bytes_read, reset_moe_stats
from dsd.shard.kernels import exact_activations
from tests.reference.moe_hf import hf_logits
from tests.reference.moe_ref import deepseek2_logits
from tests.tiny_moe import write_tiny_deepseek2

TOKENS = [3, 17, 42, 5, 88, 1, 60, 33, 9, 71, 12, 50]
V2 = dict(gating=1, bias=False, groups=1, norm=False, scale=1.0)
YARN = {"factor": 4.0, "original_context_length": 64, "yarn_log_multiplier": 0.1}


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits(path, tokens=TOKENS):
    model = build_model(open_gguf(path))
    return model, model.forward(Batch.single(model.new_cache(64), tokens, all_logits=True))


@pytest.mark.parametrize("kw", [
    dict(),                                   # V3 routing, plain attn_q (V2-Lite style), split k_b/v_b
    dict(q_lora=64, n_shared=2),              # V3 query LoRA, 2 shared experts
    dict(fused_kv_b=True),                    # older files: fused attn_kv_b
    dict(V2, E=8, k=2),                       # V2-Lite: softmax, no bias, no groups, no norm
    dict(V2, scale=16.0, groups=4, groups_used=2),  # V2: group-limited greedy (group max)
    dict(yarn=YARN, q_lora=64),               # YaRN rope + mscale
    dict(qtype=Q.Q8_0, n_layers=4, dense_lead=2),
], ids=["v3-lite", "v3-qlora", "fused-kvb", "v2-lite", "v2-groups", "yarn", "q8_0"])
def test_deepseek2_matches_references(tmp_path, kw):
    path = write_tiny_deepseek2(tmp_path / "ds.gguf", **kw)
    with exact_activations():  # the architecture in float32 (8-bit products: tests/test_kernels.py)
        _, got = logits(path)
    assert got.shape == (len(TOKENS), 96)
    assert rel_err(got, deepseek2_logits(path, TOKENS)) <= 1e-3
    assert rel_err(got, hf_logits(path, TOKENS)) <= 1e-3


def test_yarn_changes_the_result(tmp_path):
    # guards against YaRN keys being silently ignored (both files share every weight)
    _, plain = logits(write_tiny_deepseek2(tmp_path / "a.gguf"))
    _, yarn = logits(write_tiny_deepseek2(tmp_path / "b.gguf", yarn=YARN))
    assert rel_err(yarn, plain) > 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_prefill_equals_decode_and_cache_holds_latent(tmp_path, fused):
    path = write_tiny_deepseek2(tmp_path / "ds.gguf", fused_kv_b=fused, q_lora=64)
    model, full = logits(path)
    cache = model.new_cache(64)
    rows = [model.forward(Batch.single(cache, TOKENS[:5], all_logits=True))]
    rows += [model.forward(Batch.single(cache, [t])) for t in TOKENS[5:]]
    assert rel_err(np.concatenate(rows), full) <= 1e-5
    # the cache holds only the compressed latent: kv_lora (32) + rope dims (16) per token
    assert set(cache.layers[0]) == {"mla"}
    assert cache.layers[0]["mla"].shape[1] == 32 + 16


def test_batched_decode_and_cli(tmp_path):
    path = write_tiny_deepseek2(tmp_path / "ds.gguf")
    model = build_model(open_gguf(path))
    prompts = [TOKENS[:4], TOKENS[3:10], TOKENS[:1]]
    caches = [model.new_cache(64) for _ in prompts]
    for c, p in zip(caches, prompts):
        model.forward(Batch.single(c, p))
    batched = model.forward(Batch.decode(caches, [7, 8, 9]))
    for j, (p, t) in enumerate(zip(prompts, [7, 8, 9])):
        alone = model.forward(Batch.single(model.new_cache(64), p + [t]))
        assert rel_err(batched[j:j + 1], alone) <= 1e-5
    out = tmp_path / "x.npy"
    subprocess.run([sys.executable, "-m", "dsd.cli", "logits", "--model", path,
                    "--tokens", " ".join(map(str, TOKENS)), "--out", str(out)], check=True)
    assert rel_err(np.load(out), hf_logits(path, TOKENS)) <= 1e-3


def test_decode_reads_only_chosen_experts(tmp_path):
    path = write_tiny_deepseek2(tmp_path / "ds.gguf", qtype=Q.Q8_0, n_layers=3, dense_lead=1, E=16, k=4)
    model = build_model(open_gguf(path))
    cache = model.new_cache(64)
    model.forward(Batch.single(cache, TOKENS[:6]))
    reset_moe_stats(model)
    model.forward(Batch.single(cache, [TOKENS[6]]))
    # one token, 2 MoE layers, 4 distinct experts each; Q8_0 expert = gate+up [32, 64] + down [64, 32]
    per_expert = 2 * 32 * (64 // 32 * 34) + 64 * (32 // 32 * 34)
    assert moe_bytes_read(model) == 2 * 4 * per_expert
