"""Synthetic DeepSeek-shaped GGUF: valid blocks, complete metadata and tokenizer, dsd runs it and
agrees with the float64 reference on its quantized (Q4_K / Q8_0 / Q5_0) weights."""
import subprocess
import sys

import numpy as np

from dsd.shard.kernels import exact_activations
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.synth import SynthSpec, random_blocks, write_synthetic
from tests.reference.moe_ref import deepseek2_logits

SMALL = dict(layers=3, hidden=256, heads=2, experts=8, experts_used=2, shared=1, expert_ffn=352,
             dense_ffn=512, kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, dense_lead=1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16])
def test_random_blocks_decode_to_finite_values_of_chosen_size(qtype):
    raw = random_blocks(qtype, (16, 1024), np.random.default_rng(0), std=0.05)
    a = dequantize(raw, qtype)
    assert a.shape == (16, 1024) and np.isfinite(a).all()
    assert 0.02 < a.std() < 0.1 and abs(a.mean()) < 0.02


def test_synthetic_model_runs_and_matches_reference(tmp_path):
    path = tmp_path / "syn.gguf"
    res = write_synthetic(path, SynthSpec(**SMALL, fallback_qtype="Q5_0"))
    assert res["bytes"] > res["tensor_bytes"] > 0
    g = open_gguf(str(path))
    md = g.metadata
    assert md["general.architecture"] == "deepseek2"
    assert md["deepseek2.attention.q_lora_rank"] == 0            # llama.cpp requires the key
    assert len(md["tokenizer.ggml.tokens"]) == g.tensors["token_embd.weight"].shape[0] == 49152
    assert md["tokenizer.ggml.pre"] == "smollm" and len(md["tokenizer.ggml.merges"]) > 1000
    t = g.tensors
    assert t["blk.1.ffn_gate_exps.weight"].type_name == "Q4_K"        # 256-wide rows
    assert t["blk.1.ffn_down_exps.weight"].type_name == "Q5_0"        # 352-wide rows -> fallback
    assert t["blk.1.attn_k_b.weight"].type_name == "Q5_0"            # 64-wide rows
    assert t["blk.1.ffn_gate_inp.weight"].type_name == "F32"
    assert t["blk.1.attn_k_b.weight"].shape == (2, 256, 64)
    from dsd.shard.tokenizer import Tokenizer
    assert Tokenizer.from_metadata(md).encode("Hello world")
    model = build_model(g)
    tokens = [1, 500, 1000, 42, 7, 9000, 33, 12]
    with exact_activations():  # float32 activations: the architecture to float32 rounding
        got = model.forward(Batch.single(model.new_cache(64), tokens, all_logits=True))
    assert np.isfinite(got).all() and got.std() > 0.1
    ref = deepseek2_logits(str(path), tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3
    # the default path (Q4_K products with 8-bit activations on VNNI CPUs, as llama.cpp does)
    fast = model.forward(Batch.single(model.new_cache(64), tokens, all_logits=True))
    assert np.abs(fast - ref).max() / np.abs(ref).max() <= 2e-2
    assert (fast.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_cli_writes_file_and_refuses_overwrite(tmp_path):
    out = tmp_path / "s.gguf"
    args = [sys.executable, "-m", "dsd.cli", "synth", str(out), "--layers", "2", "--hidden", "256",
            "--experts", "4", "--experts-used", "2", "--expert-ffn", "256", "--dense-ffn", "256",
            "--kv-lora", "256", "--heads", "2", "--type", "q8_0", "--no-yarn"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    g = open_gguf(str(out))
    assert g.metadata["deepseek2.block_count"] == 2 and "deepseek2.rope.scaling.type" not in g.metadata
    assert g.tensors["blk.1.ffn_up_exps.weight"].type_name == "Q8_0"
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "--force" in r.stderr
    r = subprocess.run(args[:-3] + ["--type", "Q7_X", "--force"], capture_output=True, text=True)
    assert r.returncode == 1 and "not supported" in r.stderr
